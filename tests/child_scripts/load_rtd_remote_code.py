"""Load an RTD pretraining folder and its exported discriminator with `trust_remote_code=True` where the package
cannot be imported, and save their outputs on the saved inputs (run by test_rtd).

    python load_rtd_remote_code.py PRETRAINING_FOLDER DISCRIMINATOR_FOLDER DATA_FILE   # writes DATA_FILE.out
"""

import sys


class BlockPackage:  # the package is installed in the venv: make it unimportable here
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] == "modeling_deberta_custom":
            raise ImportError(fullname + " is blocked in this process")


sys.meta_path.insert(0, BlockPackage())
import torch  # noqa: E402
import transformers  # noqa: E402

pretraining_folder, discriminator_folder, data_file = sys.argv[1:4]
data = torch.load(data_file)
rtd = transformers.AutoModelForPreTraining.from_pretrained(pretraining_folder, trust_remote_code=True).eval()
classifier = transformers.AutoModelForSequenceClassification.from_pretrained(
    discriminator_folder, trust_remote_code=True, num_labels=2).eval()
with torch.no_grad():
    torch.save({
        "modules": [type(rtd).__module__, type(classifier).__module__],
        "rtd_logits": rtd(data["input_ids"], data["attention_mask"]).logits,
        "hidden": classifier.deberta(data["input_ids"], data["attention_mask"]).last_hidden_state,
    }, data_file + ".out")
