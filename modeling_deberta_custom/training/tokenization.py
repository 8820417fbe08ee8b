"""Tokenizers for DeBERTa: the official SentencePiece model as an exact fast tokenizer, and tokenizer folders that
load under transformers 4.x as well as 5.x.

  * `spm_tokenizer` / `write_spm_tokenizer_folder` / `load_pretraining_tokenizer`: a SentencePiece `spm.model`
    (the official DeBERTa-v3 one) as a transformers fast tokenizer that reproduces SentencePiece's ids exactly.
  * `save_tokenizer` / `make_tokenizer_portable` / `PortableTokenizerCallback`: tokenizer folders (ours, and those
    the Trainer writes) that AutoTokenizer loads under transformers 4.x as well as 5.x.

Training-only code (the training wing): the modeling files never import it.
"""

from __future__ import annotations

import json
import os
import shutil

from transformers import TrainerCallback

SPM_SPECIAL_TOKENS = dict(pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]",
                          mask_token="[MASK]", bos_token="[CLS]", eos_token="[SEP]")


def spm_tokenizer(spm_path, model_max_length: int = 512):
    """A transformers fast tokenizer equivalent to the SentencePiece model at `spm_path` (DeBERTa-v3 layout: [PAD],
    [CLS], [SEP], [UNK] at ids 0-3; [MASK] added after the pieces, id 128000 for the official model).

    Built here rather than by transformers' DeBERTa-v2 converter because that converter drops SentencePiece's byte
    fallback (4.57 warns so) and, in transformers 5.x, also its normaliser (the model's precompiled NFKC map): '…',
    emoji and other characters then become [UNK] or different ids. This conversion keeps both, and matches `sentencepiece` itself
    id for id (tests/test_tokenizer_official.py)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    proto = sentencepiece_model_pb2.ModelProto()
    with open(spm_path, "rb") as handle:
        proto.ParseFromString(handle.read())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        raise ValueError(f"{spm_path} is not a Unigram SentencePiece model (DeBERTa-v3's is)")
    vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    unknown = [i for i, piece in enumerate(proto.pieces) if piece.type == sentencepiece_model_pb2.ModelProto.SentencePiece.UNKNOWN]
    tokenizer = Tokenizer(Unigram(vocab, unk_id=unknown[0] if unknown else None,
                                  byte_fallback=proto.trainer_spec.byte_fallback))
    spec = proto.normalizer_spec
    steps = []
    if spec.remove_extra_whitespaces:
        steps.append(normalizers.Strip())
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="always" if spec.add_dummy_prefix else "never"
    )
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    specials = [SPM_SPECIAL_TOKENS[name] for name in ("pad_token", "cls_token", "sep_token", "unk_token", "mask_token")]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"], **SPM_SPECIAL_TOKENS,
    )


def make_tokenizer_portable(folder) -> None:
    """Rewrite the tokenizer_config.json in `folder` so that transformers 4.x loads it too: transformers 5 writes its
    class name `TokenizersBackend`, which 4.x lacks; both load the old name `PreTrainedTokenizerFast`. Other classes
    (DebertaV2Tokenizer, ...) and folders without a tokenizer are left as they are."""
    config_file = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(config_file):
        return
    with open(config_file, encoding="utf-8") as handle:
        tokenizer_config = json.load(handle)
    if tokenizer_config.get("tokenizer_class") != "TokenizersBackend":
        return
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_file, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(tokenizer_config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def save_tokenizer(tokenizer, folder) -> str:
    """`tokenizer.save_pretrained(folder)`, loadable by AutoTokenizer under transformers 4.x and 5.x."""
    tokenizer.save_pretrained(folder)
    make_tokenizer_portable(folder)
    return str(folder)


class PortableTokenizerCallback(TrainerCallback):
    """Makes the tokenizer in each Trainer checkpoint portable (`make_tokenizer_portable`); the Trainer saves it there
    through `processing_class.save_pretrained`. For `trainer.save_model()` call `make_tokenizer_portable` after it."""

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            make_tokenizer_portable(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


def write_spm_tokenizer_folder(spm_path, folder, model_max_length: int = 512) -> str:
    """Save `spm_tokenizer(spm_path)` to `folder` (tokenizer.json, tokenizer_config.json, plus a copy of spm.model) so
    that `AutoTokenizer.from_pretrained(folder)` loads it, in transformers 4.x and 5.x alike."""
    save_tokenizer(spm_tokenizer(spm_path, model_max_length=model_max_length), folder)
    if os.path.abspath(os.path.join(folder, "spm.model")) != os.path.abspath(spm_path):
        shutil.copyfile(spm_path, os.path.join(folder, "spm.model"))
    return str(folder)


def load_pretraining_tokenizer(path):
    """A tokenizer from `path`: an `spm.model` file, a folder holding one without a tokenizer.json (the official
    DeBERTa-v3 layout; converted with `spm_tokenizer`), or any folder AutoTokenizer loads (e.g. the output of
    scripts/train_tokenizer.py, or one written by `write_spm_tokenizer_folder`)."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".model"):
        return spm_tokenizer(path)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "tokenizer.json")):
        spm_file = os.path.join(path, "spm.model")
        if os.path.exists(spm_file):
            return spm_tokenizer(spm_file)
    return AutoTokenizer.from_pretrained(path)


def special_token_ids(tokenizer) -> list[int]:
    return sorted({int(i) for i in tokenizer.all_special_ids if i is not None})


__all__ = [
    "PortableTokenizerCallback",
    "load_pretraining_tokenizer",
    "make_tokenizer_portable",
    "save_tokenizer",
    "special_token_ids",
    "spm_tokenizer",
    "write_spm_tokenizer_folder",
]
