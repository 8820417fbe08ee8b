"""Serving: repeated inference keeps nothing alive between calls, and transformers pipelines (text classification,
token classification, question answering, fill-mask with the Enhanced Mask Decoder) run on our models with a DeBERTa
tokenizer, batched and padded to a multiple of a length bucket.

Tokenizers: the real DeBERTa-v3 SentencePiece model from ../shared (loaded as the Hub repos are: a folder holding
spm.model and a config.json with model_type deberta-v2), and a small Unigram tokenizer trained here with the
`tokenizers` library in the same style (Metaspace pieces, [CLS] A [SEP] B [SEP]), which needs no files and always runs.

transformers 5 removed the question-answering pipeline; there the span is taken from the model's logits and the
tokenizer's offsets (the docs/serving.md snippet shows how), and the pipeline itself is exercised where transformers has it.
"""

import contextlib
import gc
import io
import json
import random
import shutil

import pytest
import torch
from helpers import SHARED_DATA, doc_block, perturb_parameters, tiny_config
from transformers import AutoTokenizer, pipeline

from modeling_deberta_custom import (
    DebertaCustomForMaskedLM,
    DebertaCustomForQuestionAnswering,
    DebertaCustomForSequenceClassification,
    DebertaCustomForTokenClassification,
    DebertaCustomModel,
)

SPM_MODEL = SHARED_DATA / "tokenizers" / "deberta-v3" / "spm.model"
LABELS = {"text-classification": ["negative", "positive"], "token-classification": ["O", "B-PER", "I-PER", "B-LOC"]}


# ----------------------------------------------------------------------------------------------------------------------
# Nothing kept alive between calls
# ----------------------------------------------------------------------------------------------------------------------


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))  # type(): no __getattr__ side effects


def _random_call(models, rng: random.Random):
    """One inference call of a random model, batch size, length and padding."""
    name, model = rng.choice(models)
    # past the bucket range (8) and, where positions are relative only, past max_position_embeddings (64)
    limit = model.config.max_position_embeddings if name == "masked-lm" else 100
    batch, length = rng.randint(1, 4), rng.randint(1, limit)
    input_ids = torch.randint(1, model.config.vocab_size, (batch, length))
    attention_mask = torch.ones_like(input_ids)
    for row in range(batch):
        attention_mask[row, rng.randint(0, length):] = 0  # any amount of right padding, fully padded rows included
    with torch.inference_mode():
        output = model(input_ids=input_ids, attention_mask=attention_mask)
    return output[0].shape


@pytest.fixture(scope="module")
def serving_models():
    models = []
    for name, model_class, implementation in (("base", DebertaCustomModel, "sdpa"),
                                              ("masked-lm", DebertaCustomForMaskedLM, "eager"),
                                              ("sequence-classification", DebertaCustomForSequenceClassification,
                                               "sdpa")):
        model = model_class(tiny_config(num_labels=2, vocab_size=64)).eval()
        model.config._attn_implementation = implementation
        models.append((name, model))
    return models


def test_repeated_inference_keeps_no_tensors_alive(serving_models):
    rng = random.Random(0)
    for _ in range(30):  # warm-up: lazily created state (kernels, dispatch caches) is not a leak
        _random_call(serving_models, rng)
    before = live_tensors()
    shapes = {_random_call(serving_models, rng) for _ in range(1000)}
    after = live_tensors()
    assert len(shapes) > 250  # the calls really did vary in shape
    assert after <= before, f"{after - before} tensors more alive after 1,000 calls ({before} -> {after})"


def test_the_live_tensor_count_sees_a_cache(serving_models):
    """The counter is sensitive: a forward hook that keeps each output (a cache keyed by shape) shows up."""
    rng = random.Random(1)
    _, model = serving_models[0]
    cache = {}
    handle = model.register_forward_hook(lambda module, args, output: cache.setdefault(output[0].shape, output[0]))
    try:
        before = live_tensors()
        for _ in range(20):
            _random_call([serving_models[0]], rng)
        assert live_tensors() - before >= len(cache) > 0
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]  # ids 0..4, as DeBERTa numbers [PAD] [CLS] [SEP] [UNK]
WORDS = ("the quick brown fox jumps over a lazy dog near river in paris where alice wrote book about city of france "
         "and london model learns language from long text while people read short review plot was good bad").split()


def train_small_tokenizer():
    """A DeBERTa-style tokenizer (Unigram pieces with Metaspace, like the SentencePiece model) trained in a second
    on generated sentences; a fast tokenizer, so pipelines get offsets."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) + "." for _ in range(400)]
    corpus += ["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,?!'-"]
    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                                                unk_token="[UNK]"))
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                   unk_token="[UNK]", mask_token="[MASK]", model_max_length=512)


def load_deberta_v3_tokenizer(folder):
    """The official spm.model loads as the Hub repos do: AutoTokenizer on a folder that also holds a config.json with
    model_type deberta-v2 (DebertaV2Tokenizer(vocab_file=...) alone would ignore the file in transformers 5)."""
    folder.mkdir()
    shutil.copy(SPM_MODEL, folder / "spm.model")
    (folder / "config.json").write_text(json.dumps({"model_type": "deberta-v2"}))
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module", params=["trained-in-test", "deberta-v3-spm"])
def tokenizer(request, tmp_path_factory):
    if request.param == "trained-in-test":
        return train_small_tokenizer()
    if not SPM_MODEL.is_file():
        pytest.skip(f"{SPM_MODEL} not found (the in-test tokenizer case covers pipelines without it)")
    tokenizer = load_deberta_v3_tokenizer(tmp_path_factory.mktemp("spm") / "deberta-v3")
    assert len(tokenizer) >= 128001 and tokenizer.mask_token_id == 128000
    return tokenizer


HEAD_CLASSES = {
    "text-classification": DebertaCustomForSequenceClassification,
    "token-classification": DebertaCustomForTokenClassification,
    "question-answering": DebertaCustomForQuestionAnswering,
    "fill-mask": DebertaCustomForMaskedLM,
}


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory):
    """One saved folder per task (weights, config with labels, remote code and the tokenizer), as served."""
    root = tmp_path_factory.mktemp("checkpoints")
    vocab_size = max(len(tokenizer), tokenizer.vocab_size)
    folders = {}
    for task, model_class in HEAD_CLASSES.items():
        labels = LABELS.get(task)
        overrides = dict(vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id, max_position_embeddings=256)
        if labels:
            overrides.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                             label2id={label: i for i, label in enumerate(labels)})
        model = model_class(tiny_config(**overrides)).eval()
        perturb_parameters(model, scale=0.2, seed=len(folders))
        folders[task] = root / task
        model.save_pretrained(folders[task])
        tokenizer.save_pretrained(folders[task])
    return folders


TEXTS = ["The plot was good.", "A long review about a book that alice wrote in paris, and the city of london. " * 4,
         "Short.", "the quick brown fox jumps over the lazy dog near the river"]


def test_text_classification_pipeline_batched_and_padded_to_a_bucket(checkpoints):
    classifier = pipeline("text-classification", model=str(checkpoints["text-classification"]))
    assert isinstance(classifier.model, DebertaCustomForSequenceClassification)
    seen = []
    classifier.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape),
                                               with_kwargs=True)
    padded = classifier(TEXTS, batch_size=3, truncation=True, padding=True, pad_to_multiple_of=16, top_k=None)
    assert seen and all(length % 16 == 0 for _, length in seen), seen  # steady shapes: multiples of the bucket
    assert [batch for batch, _ in seen] == [3, 1]

    plain = classifier(TEXTS, top_k=None)  # one at a time, unpadded: padding must not change the answer
    for with_padding, without in zip(padded, plain, strict=True):
        assert {d["label"] for d in with_padding} == set(LABELS["text-classification"])
        scores = {d["label"]: d["score"] for d in without}
        for d in with_padding:
            assert d["score"] == pytest.approx(scores[d["label"]], abs=1e-5)

    # Same numbers as calling the model directly.
    encoded = classifier.tokenizer(TEXTS[0], return_tensors="pt")
    with torch.inference_mode():
        probs = classifier.model(**encoded).logits.softmax(-1)[0]
    expected = {LABELS["text-classification"][i]: float(p) for i, p in enumerate(probs)}
    for d in plain[0]:
        assert d["score"] == pytest.approx(expected[d["label"]], abs=1e-5)


def test_token_classification_pipeline(checkpoints):
    tagger = pipeline("token-classification", model=str(checkpoints["token-classification"]), ignore_labels=[])
    results = tagger(TEXTS, batch_size=2)
    assert len(results) == len(TEXTS)
    for text, entities in zip(TEXTS, results, strict=True):
        assert entities
        for entity in entities:
            assert entity["entity"] in LABELS["token-classification"]
            assert 0 <= entity["start"] <= entity["end"] <= len(text)
    grouped = tagger(TEXTS[1], aggregation_strategy="simple")
    assert all(group["entity_group"] in {"O", "PER", "LOC"} for group in grouped)


def test_fill_mask_pipeline_with_the_enhanced_mask_decoder(checkpoints):
    fill = pipeline("fill-mask", model=str(checkpoints["fill-mask"]))
    assert isinstance(fill.model, DebertaCustomForMaskedLM) and fill.model.config.uses_enhanced_mask_decoder
    mask = fill.tokenizer.mask_token
    inputs = [f"The book was written by {mask} in paris.", f"{mask} quick brown fox jumps " + "over the lazy dog " * 6]
    padded = fill(inputs, top_k=3, batch_size=2,
                  tokenizer_kwargs={"truncation": True, "padding": True, "pad_to_multiple_of": 16})
    plain = fill(inputs, top_k=3)
    for with_padding, without in zip(padded, plain, strict=True):
        assert len(with_padding) == 3
        assert [d["token"] for d in with_padding] == [d["token"] for d in without]
        assert [d["score"] for d in with_padding] == pytest.approx([d["score"] for d in without], abs=1e-5)
        assert all(mask not in d["sequence"] for d in with_padding)

    # The pipeline's top token is the argmax of the EMD logits at the mask.
    encoded = fill.tokenizer(inputs[0], return_tensors="pt")
    with torch.inference_mode():
        logits = fill.model(**encoded).logits[0]
    position = int((encoded["input_ids"][0] == fill.tokenizer.mask_token_id).nonzero()[0, 0])
    assert plain[0][0]["token"] == int(logits[position].argmax())


def qa_pipeline_available() -> bool:
    from transformers.pipelines import SUPPORTED_TASKS

    return "question-answering" in SUPPORTED_TASKS


def extract_answer(tokenizer, model, question, context, max_answer_tokens=30):
    """The highest-scoring span of the context (start and end inside the context, end >= start), as characters."""
    encoded = tokenizer(question, context, truncation="only_second", max_length=512, return_offsets_mapping=True,
                        return_tensors="pt")
    offsets = encoded.pop("offset_mapping")[0]
    in_context = torch.tensor([s == 1 for s in encoded.sequence_ids(0)])
    with torch.inference_mode():
        out = model(**encoded)
    start = int(out.start_logits[0].masked_fill(~in_context, float("-inf")).argmax())
    window = slice(start, start + max_answer_tokens)
    end = start + int(out.end_logits[0, window].masked_fill(~in_context[window], float("-inf")).argmax())
    return int(offsets[start][0]), int(offsets[end][1])


def test_question_answering(checkpoints):
    from transformers import AutoModelForQuestionAnswering

    folder = str(checkpoints["question-answering"])
    question = "Who wrote the book?"
    context = "The book was written by alice in paris, a city of france, near the river."
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForQuestionAnswering.from_pretrained(folder).eval()
    assert isinstance(model, DebertaCustomForQuestionAnswering)
    start, end = extract_answer(tokenizer, model, question, context)
    assert 0 <= start < end <= len(context)

    if qa_pipeline_available():  # transformers 4.x
        qa = pipeline("question-answering", model=folder)
        answers = qa(question=[question, "Where?"], context=[context, context], batch_size=2)
        for answer in answers:
            assert answer["answer"] == context[answer["start"]:answer["end"]]
        assert (answers[0]["start"], answers[0]["end"]) == (start, end)
    else:  # transformers 5 removed the task: the name is refused with a pointer to the migration guide
        with pytest.raises(KeyError, match="question-answering"):
            pipeline("question-answering", model=folder)


# ----------------------------------------------------------------------------------------------------------------------
# The serving block of docs/serving.md, run as written (paths substituted), so the two cannot drift
# ----------------------------------------------------------------------------------------------------------------------

SERVING_SNIPPET = doc_block("serving")
SNIPPET_PATHS = {"path/to/sst2-model": "text-classification", "path/to/mlm-model": "fill-mask",
                 "path/to/ner-model": "token-classification", "path/to/qa-model": "question-answering"}


def test_serving_snippet_runs(checkpoints):
    code = SERVING_SNIPPET
    for placeholder, task in SNIPPET_PATHS.items():
        code = code.replace(placeholder, str(checkpoints[task]))
    printed = io.StringIO()
    namespace = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "docs/serving.md", "exec"), namespace)
    assert namespace["probabilities"].shape == (2, 2)
    assert namespace["batch"]["input_ids"].shape[1] % 64 == 0
    assert printed.getvalue().count("\n") >= 5
