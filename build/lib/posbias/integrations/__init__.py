"""Bridges to other libraries, each imported only on use: :mod:`posbias.integrations.flex`
(FlexAttention ``score_mod`` export and backend) and :mod:`posbias.integrations.hf` (Hugging Face
``transformers`` T5-family and BLOOM models on posbias attention)."""
