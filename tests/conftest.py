import os
import sys

import pytest
import torch

# Without a GPU the `triton` backend's programs run in Triton's interpreter (tests/test_table_flash.py),
# which must be switched on before triton is first imported; with one they compile, as do the
# programs of torch.compile, so the switch stays off there
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A small local corpus (about 41 KB) for end-to-end study runs in seconds."""
    f = tmp_path_factory.mktemp("corpus") / "data.txt"
    f.write_text("".join(f"row {i}: pack my box with {i % 17} dozen liquor jugs\n" for i in range(900)))
    return f
