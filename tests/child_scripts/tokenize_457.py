"""Token ids of one text from AutoTokenizer.from_pretrained(folder) under transformers 4.57 (run by
helpers.tokenize_under_transformers_457 with the 4.57 side folder on PYTHONPATH).

    python tokenize_457.py TEXT FOLDER [FOLDER ...]   # prints {folder: input_ids} as JSON
"""

import json
import sys

import transformers
from transformers import AutoTokenizer

assert transformers.__version__.startswith("4.57."), transformers.__version__
text, folders = sys.argv[1], sys.argv[2:]
print(json.dumps({folder: AutoTokenizer.from_pretrained(folder)(text)["input_ids"] for folder in folders}))
