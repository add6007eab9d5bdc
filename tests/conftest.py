import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A small local corpus (about 41 KB) for end-to-end study runs in seconds."""
    f = tmp_path_factory.mktemp("corpus") / "data.txt"
    f.write_text("".join(f"row {i}: pack my box with {i % 17} dozen liquor jugs\n" for i in range(900)))
    return f
