"""A folder written by scripts/train_tokenizer.py loads under transformers 4.x with DeBERTa's special ids and pair
template (run by test_train_tokenizer with the 4.57 side folder on PYTHONPATH).

    python check_tokenizer_457.py TOKENIZER_FOLDER
"""

import sys

import transformers
from transformers import AutoTokenizer

assert transformers.__version__.startswith("4."), transformers.__version__
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
encoded = tokenizer("the cat", "a dog")
assert encoded["input_ids"][0] == 1 and encoded["input_ids"][-1] == 2 and tokenizer.mask_token_id == 4
assert encoded["token_type_ids"][-1] == 1
