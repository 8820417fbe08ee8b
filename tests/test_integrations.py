"""The libraries users pair DeBERTa with most, over our classes and saved folders (issue 12, point 11):

- peft LoRA: a few training steps touch only the adapter and the saved head modules, the adapter saved and reloaded onto
  a fresh base gives the trained model's outputs, and merge_and_unload gives them with a plain model of our class.
- sentence-transformers: CrossEncoder and SentenceTransformer load our folders (through the Auto classes), predict /
  encode as the model called directly does, train a few steps, and reload from their saved folders with equal outputs.

Both libraries are in the `integrations` extra (README set-up): the tests skip only where a library is not installed.
"""

import pytest
import torch
from helpers import REPO_ROOT, perturb_parameters, random_batch, tiny_config
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from modeling_deberta_custom import DebertaCustomForSequenceClassification, DebertaCustomModel

# What docs/integrations.md recommends: peft's own defaults for deberta-v2 (our v2/v3 modules carry the same names), and the
# head modules that peft's DeBERTa guide keeps trainable and saves with the adapter.
LORA_TARGET_MODULES = ["query_proj", "value_proj"]
LORA_MODULES_TO_SAVE = ["classifier", "pooler"]


# DeBERTa v1's fused projection: peft's own default for `deberta` (the attention calls in_proj, so LoRA takes part).
V1 = dict(attention_variant="v1", position_buckets=-1, share_att_key=False, norm_rel_ebd="none",
          max_relative_positions=12)


@pytest.mark.parametrize("overrides, target_modules", [({}, LORA_TARGET_MODULES), (V1, ["in_proj"])],
                         ids=["v3", "v1_in_proj"])
def test_lora_trains_saves_reloads_and_merges(tmp_path, overrides, target_modules):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = DebertaCustomForSequenceClassification(tiny_config(num_labels=3, **overrides))
    perturb_parameters(base)
    base.save_pretrained(tmp_path / "base")
    input_ids, attention_mask = random_batch(base.config.vocab_size, batch=4, length=10)
    labels = torch.tensor([0, 1, 2, 1])

    model = peft.get_peft_model(
        DebertaCustomForSequenceClassification.from_pretrained(tmp_path / "base"),
        peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=target_modules,
                        modules_to_save=LORA_MODULES_TO_SAVE),
    )
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in name or ".modules_to_save." in name for name in trainable), trainable
    for needed in (*(f"{target}.lora_B" for target in target_modules), "classifier.modules_to_save",
                   "pooler.modules_to_save"):
        assert any(needed in name for name in trainable), needed
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b), "a LoRA matrix received no gradient"
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} is frozen under LoRA but changed"

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        before = base.eval()(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (expected - before).abs().max() > 1e-3, "training left the outputs unchanged"
    model.save_pretrained(tmp_path / "adapter")

    # The adapter (LoRA matrices plus classifier and pooler) onto a fresh base gives the trained model back.
    fresh = DebertaCustomForSequenceClassification.from_pretrained(tmp_path / "base")
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids, attention_mask=attention_mask).logits, expected,
                                   rtol=0, atol=1e-6)

    merged = loaded.merge_and_unload()
    assert type(merged) is DebertaCustomForSequenceClassification
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=input_ids, attention_mask=attention_mask).logits, expected,
                                   rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert type(reloaded) is DebertaCustomForSequenceClassification
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids, attention_mask=attention_mask).logits, expected,
                                   rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# sentence-transformers
# ----------------------------------------------------------------------------------------------------------------------

PAIRS = [("a cat sat on the mat", "the cat sat on a mat"), ("rain fell all day", "the sun rose early"),
         ("he plays the piano", "he plays piano"), ("stocks fell sharply", "a bird sang")]
PAIR_LABELS = [1.0, 0.0, 1.0, 0.0]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REPO_ROOT / "data" / "tokenizer")


def save_with_tokenizer(model, tokenizer, folder):
    perturb_parameters(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval()


def training_arguments(arguments_class, output_dir):
    return arguments_class(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                           use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
                           dataloader_num_workers=0)


def test_cross_encoder_predicts_trains_and_reloads(tmp_path, tokenizer):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    torch.manual_seed(0)
    model = save_with_tokenizer(DebertaCustomForSequenceClassification(tiny_config(vocab_size=len(tokenizer),
                                                                                   num_labels=1)),
                                tokenizer, tmp_path / "start")
    cross_encoder = sentence_transformers.CrossEncoder(str(tmp_path / "start"), device="cpu")
    assert type(cross_encoder[0].auto_model) is DebertaCustomForSequenceClassification
    # predict = sigmoid of the model's logit over the tokenized pair
    inputs = tokenizer([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = torch.sigmoid(model(**inputs).logits.squeeze(-1))
    torch.testing.assert_close(torch.as_tensor(cross_encoder.predict(PAIRS)), expected, rtol=0, atol=1e-6)

    train = Dataset.from_dict({"sentence1": [a for a, _ in PAIRS], "sentence2": [b for _, b in PAIRS],
                               "label": PAIR_LABELS})
    CrossEncoderTrainer(model=cross_encoder, args=training_arguments(CrossEncoderTrainingArguments, tmp_path / "run"),
                        train_dataset=train, loss=BinaryCrossEntropyLoss(cross_encoder)).train()
    trained = torch.as_tensor(cross_encoder.predict(PAIRS))
    assert (trained - expected).abs().max() > 1e-4, "training left the scores unchanged"

    cross_encoder.save_pretrained(str(tmp_path / "trained"))
    reloaded = sentence_transformers.CrossEncoder(str(tmp_path / "trained"), device="cpu")
    torch.testing.assert_close(torch.as_tensor(reloaded.predict(PAIRS)), trained, rtol=0, atol=1e-6)
    # The saved folder is still ours: transformers' Auto class loads it without sentence-transformers.
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "trained").eval()
    assert type(plain) is DebertaCustomForSequenceClassification
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(plain(**inputs).logits.squeeze(-1)), trained, rtol=0, atol=1e-6)


def test_sentence_transformer_encodes_trains_and_reloads(tmp_path, tokenizer):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from datasets import Dataset
    from sentence_transformers.sentence_transformer import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    torch.manual_seed(0)
    model = save_with_tokenizer(DebertaCustomModel(tiny_config(vocab_size=len(tokenizer))), tokenizer,
                                tmp_path / "start")
    encoder = sentence_transformers.SentenceTransformer(str(tmp_path / "start"), device="cpu")
    assert type(encoder[0].auto_model) is DebertaCustomModel
    # encode = mean of the backbone's last hidden states over the non-padding tokens
    sentences = [a for a, _ in PAIRS]
    inputs = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(torch.as_tensor(encoder.encode(sentences)), expected, rtol=0, atol=1e-6)

    train = Dataset.from_dict({"anchor": [a for a, _ in PAIRS], "positive": [b for _, b in PAIRS]})
    SentenceTransformerTrainer(model=encoder,
                               args=training_arguments(SentenceTransformerTrainingArguments, tmp_path / "run"),
                               train_dataset=train, loss=MultipleNegativesRankingLoss(encoder)).train()
    trained = torch.as_tensor(encoder.encode(sentences))
    assert (trained - expected).abs().max() > 1e-4, "training left the embeddings unchanged"

    encoder.save_pretrained(str(tmp_path / "trained"))
    reloaded = sentence_transformers.SentenceTransformer(str(tmp_path / "trained"), device="cpu")
    assert type(reloaded[0].auto_model) is DebertaCustomModel
    torch.testing.assert_close(torch.as_tensor(reloaded.encode(sentences)), trained, rtol=0, atol=1e-6)
