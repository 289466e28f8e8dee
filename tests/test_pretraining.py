"""Language-model pretraining in the train stage (stages/core/modeling/pretraining.py) and its
batch source (BlockBatches): blocks, masks, perplexity, resume, the corpus's hold-outs, bad
input, and fine-tuning on the pretrained base. Tiny models on generated text, offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import state_copy, states_equal
from tiny_text import bert_tokenizer, gpt2_tokenizer, labelled_texts

from stages.core.common.errors import DataError, ModelError, ParamsError
from stages.core.common.params import parse_params
from stages.core.common.schema import DOMAIN, LABEL, TEXT
from stages.core.engine.batches import IGNORE_INDEX, BlockBatches
from stages.core.engine.checkpoints import Checkpoints
from stages.core.modeling import pretraining
from stages.core.modeling.finetuning import finetune_text
from stages.core.modeling.pretraining import (
    group_texts,
    perplexity,
    perplexity_rows,
    pretrain,
    pretraining_summary,
    samples_report,
    training_texts,
)
from stages.core.modeling.text import load_text_model, save_text_model

OBJECTIVE = {"bert": "mlm", "gpt2": "clm"}


def split(n: int, seed: int) -> pd.DataFrame:
    texts, labels = labelled_texts(n, seed)
    return pd.DataFrame({TEXT: texts, LABEL: labels, DOMAIN: "base"})


def build_tokenizers(root: Path) -> dict[str, Path]:
    """A WordPiece (BERT) and a byte-level BPE (GPT-2) tokenizer folder under ``root``, as the
    tokenizer stage writes models/tokenizer/ (save_pretrained)."""
    folders = {"bert": root / "bert", "gpt2": root / "gpt2"}
    bert_tokenizer().save_pretrained(folders["bert"])
    gpt2_tokenizer().save_pretrained(folders["gpt2"])
    return folders


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    return build_tokenizers(tmp_path_factory.mktemp("tokenizers"))


TOKENIZER_KIND = {"bert": "wordpiece", "gpt2": "bpe"}


def lm_params(kind: str, pretrained: str | None = None, **train):
    return parse_params(
        {
            "data": {"text_column": "review", "features": None, "image_shape": None},
            "model": {
                "arch": "hf",
                "pretrained": pretrained,
                # From scratch, the tokenize stage's kind; a checkpoint keeps its own.
                "tokenizer": {"kind": TOKENIZER_KIND[kind] if pretrained is None else "pretrained"},
                "max_length": 32,
                "hf": {
                    "model_type": kind,
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "max_positions": 64,
                },  # fmt: skip
            },
            "train": {
                "objective": OBJECTIVE[kind],
                "epochs": 5,
                "batch_size": 16,
                "lr": 0.003,
                "block_size": 32,
                "checkpoint_every": None,
                "patience": None,
            }
            | train,
            "finetune": {"shots_per_class": None, "epochs": 3, "batch_size": 16, "lr": 0.003},
        }  # fmt: skip
    )


def test_group_texts_packs_and_counts_the_remainder() -> None:
    ids = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    packed = group_texts(ids, 4, pack=True)
    assert packed.blocks == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert (packed.documents, packed.tokens, packed.dropped) == (3, 9, 1)
    apart = group_texts(ids, 3, pack=False)  # each block inside one text; [9] alone is dropped
    assert apart.blocks == [[1, 2, 3], [4, 5], [6, 7, 8]]
    assert apart.dropped == 1
    assert group_texts(ids, 10, pack=True).blocks == []  # less than one block: none


def test_pack_false_keeps_documents_apart(tokenizers) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizers["bert"])
    params = lm_params("bert", pack=False)
    texts = ["good movie", "awful day and it was very sad"]
    batches, grouped = pretraining.lm_blocks(tokenizer, texts, 6, params, "train")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    # A block never holds two texts' tokens: no [SEP] before its last position.
    for block in grouped.blocks:
        assert sep not in block[:-1] and block.count(cls) <= 1
    assert grouped.blocks[0] == tokenizer("good movie")["input_ids"]
    assert batches.inputs(torch.tensor([0]))["attention_mask"].sum() == len(grouped.blocks[0])


def test_mlm_masks_are_bert_s_80_10_10_drawn_from_the_generator() -> None:
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (64, 64)).tolist()
    ids[0][:2] = [2, 3]  # special tokens: never targets
    data = BlockBatches.from_blocks(
        ids, 0, objective="mlm", mask_id=4, vocab_size=100, special_ids=(0, 1, 2, 3, 4)
    )
    rows = torch.arange(64)
    inputs, labels = data.labelled(rows, torch.Generator().manual_seed(1))
    again, labels_again = data.labelled(rows, torch.Generator().manual_seed(1))
    assert torch.equal(labels, labels_again) and torch.equal(
        inputs["input_ids"], again["input_ids"]
    )
    chosen = labels != IGNORE_INDEX
    assert 0.13 < chosen.float().mean() < 0.17  # mlm_probability 0.15
    assert not chosen[0, :2].any()
    original = data.ids
    assert torch.equal(labels[chosen], original[chosen])
    masked = (inputs["input_ids"] == 4) & chosen
    kept = (inputs["input_ids"] == original) & chosen
    assert 0.76 < masked.sum() / chosen.sum() < 0.84
    assert 0.07 < kept.sum() / chosen.sum() < 0.16  # 10% kept + random draws of the same id
    assert torch.equal(inputs["input_ids"][~chosen], original[~chosen])


def test_clm_targets_are_the_next_tokens_and_skip_padding() -> None:
    data = BlockBatches.from_blocks([[5, 6, 7, 8], [9, 10]], 0, objective="clm")
    inputs, labels = data.labelled(torch.arange(2), torch.Generator())
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert labels.tolist() == [[6, 7, 8, -100], [10, -100, -100, -100]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_pretraining_lowers_validation_perplexity(kind, tokenizers, tmp_path) -> None:
    params = lm_params(kind, epochs=5)
    run = pretrain(params, [split(160, 1)], split(48, 2), [split(48, 2)],
                   tokenizer_dir=tokenizers[kind])  # fmt: skip
    rows = perplexity_rows(run.result)
    first, last = rows[0]["val_perplexity"], rows[-1]["val_perplexity"]
    assert last < 0.6 * first, rows  # measured: bert 60 -> 24, gpt2 133 -> 42 (hidden 32)
    assert rows[-1]["val_perplexity"] == pytest.approx(math.exp(rows[-1]["val_loss"]), rel=1e-4)
    summary = pretraining_summary(run)
    assert summary["objective"] == OBJECTIVE[kind] and summary["val_perplexity"] == last
    assert summary["blocks"]["train"] == summary["tokens"]["train"] // 32  # packed
    assert summary["dropped_tokens"]["train"] == summary["tokens"]["train"] % 32
    # The kept epoch's masked- or next-token accuracy (on ~70 masked tokens too noisy to rank)
    assert summary["val_accuracy"] == pytest.approx(run.result.best.val_accuracy, abs=1e-6)
    assert run.config.provenance["pretrained"] == "pretrained here"
    assert len(run.config.provenance["tokenizer_md5"]) == 36  # DVC's folder md5 (.dir)
    saved = save_text_model(tmp_path / "base", run.model, run.tokenizer, run.config)
    assert saved.format == {"mlm": "hf-masked-lm", "clm": "hf-causal-lm"}[OBJECTIVE[kind]]
    report = samples_report(run.samples, OBJECTIVE[kind])
    if kind == "gpt2":
        assert len(run.samples) == 3 and report.count("\n- **") == 3
        again = pretrain(params, [split(160, 1)], split(48, 2), [split(48, 2)],
                         tokenizer_dir=tokenizers[kind])  # fmt: skip
        assert samples_report(again.samples, "clm") == report  # deterministic on the CPU
    else:
        assert run.samples == [] and "None: samples come from a causal" in report


def test_perplexity_overflow_is_null_with_a_note() -> None:
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert perplexity(1e4) is None and perplexity(math.inf) is None

    class Result:
        best = type("S", (), {"val_loss": 1e4})()

    run = type("R", (), {})()
    run.result, run.counts = Result(), {}
    run.config = type("C", (), {"trained_on": {"objective": "clm"}})()
    pretraining.fit_summary = lambda result: {"val_loss": 1e4}  # only the kept epoch matters
    try:
        summary = pretraining_summary(run)
    finally:
        from stages.core.engine.training import fit_summary

        pretraining.fit_summary = fit_summary
    assert summary["val_perplexity"] is None and "overflows" in summary["perplexity_note"]
    json.dumps(summary, allow_nan=False)


def test_no_val_or_test_text_goes_into_pretraining(tokenizers, monkeypatch) -> None:
    base_train, target_train = split(80, 1), split(60, 5)
    val, test, target_test = split(30, 2), split(30, 3), split(30, 4)
    # Some val and test texts also stand in the train splits (a duplicate the data gate let
    # through across domains): they must stay out.
    leaked = [val[TEXT][0], test[TEXT][1], target_test[TEXT][2]]
    base_train.loc[:2, TEXT] = leaked
    corpus = training_texts([base_train, target_train, base_train], [val, test, target_test])
    judged = set(val[TEXT]) | set(test[TEXT]) | set(target_test[TEXT])
    assert not judged & set(corpus.texts)
    assert corpus.held_out >= 3 and len(set(corpus.texts)) == len(corpus.texts)
    assert set(target_train[TEXT]) - judged <= set(corpus.texts)  # target train texts count

    seen: dict[str, list[str]] = {}
    blocks = pretraining.lm_blocks

    def spy(tokenizer, texts, size, params, name):
        seen[name] = list(texts)
        return blocks(tokenizer, texts, size, params, name)

    monkeypatch.setattr(pretraining, "lm_blocks", spy)
    params = lm_params("gpt2", epochs=1)
    run = pretrain(params, [base_train, target_train], val, [val, test, target_test],
                   tokenizer_dir=tokenizers["gpt2"])  # fmt: skip
    assert not judged & set(seen["train"])
    assert seen["val"] == val[TEXT].tolist()
    assert run.counts["texts"]["held_out"] == corpus.held_out


def test_a_killed_pretraining_resumes_to_the_same_bytes(tokenizers, tmp_path) -> None:
    """MLM with dropout, accumulation, clipping and a cosine schedule with warmup: killed after
    epoch 3 and resumed from its checkpoint, it ends with the bytes of an uninterrupted run
    (the masks come from the checkpointed generator)."""
    params = lm_params("bert", epochs=5, grad_accum=2, batch_size=8, schedule="cosine",
                       warmup_epochs=1, grad_clip=1.0, weight_decay=0.01)  # fmt: skip
    data = [split(60, 1)], split(24, 2), [split(24, 2)]
    whole = pretrain(params, *data, tokenizer_dir=tokenizers["bert"])

    class Killed(Exception):
        pass

    def kill_at_3(stats) -> None:
        if stats.epoch == 3:
            raise Killed

    with pytest.raises(Killed):
        pretrain(params, *data, kill_at_3, tokenizer_dir=tokenizers["bert"],
                 checkpoints=Checkpoints(tmp_path, "k", 2, "t"))  # fmt: skip
    assert (tmp_path / "checkpoint.pt").is_file()
    torch.manual_seed(123)  # a new process: other RNG state, replaced by the checkpoint's
    epochs = []
    resumed = pretrain(params, *data, lambda stats: epochs.append(stats.epoch),
                       tokenizer_dir=tokenizers["bert"],
                       checkpoints=Checkpoints(tmp_path, "k", 2, "t"))  # fmt: skip
    assert epochs == [3, 4, 5]  # resumed after the checkpoint of epoch 2
    assert states_equal(state_copy(whole.model), state_copy(resumed.model))
    assert [s.val_loss for s in whole.result.history] == [
        s.val_loss for s in resumed.result.history
    ]


@pytest.mark.parametrize(("kind", "strategy"), [("bert", "head"), ("bert", "lora"),
                                                ("gpt2", "full")])  # fmt: skip
def test_finetune_on_the_pretrained_base(kind, strategy, tokenizers, tmp_path) -> None:
    params = lm_params(kind, epochs=2)
    run = pretrain(params, [split(80, 1)], split(24, 2), [split(24, 2)],
                   tokenizer_dir=tokenizers[kind])  # fmt: skip
    save_text_model(tmp_path / "base", run.model, run.tokenizer, run.config)
    base, tokenizer, config = load_text_model(tmp_path / "base")
    assert config.provenance["pretrained"] == "pretrained here"
    # The classifier's body is the pretrained LM's body (the LM head dropped); what the LM
    # lacks (BERT's pooler, which MLM does not train) is drawn from a fixed seed.
    body = base.hf.base_model.state_dict()
    lm_body = run.model.hf.base_model.state_dict()
    assert lm_body and all(torch.equal(value, body[key]) for key, value in lm_body.items())
    again = load_text_model(tmp_path / "base")[0].hf.base_model.state_dict()
    assert states_equal(body, again)
    tuned_params = lm_params(kind).model_copy(
        update={"finetune": params.finetune.model_copy(update={"strategy": strategy})}
    )
    tuned = finetune_text(base, tokenizer, config, split(40, 3), split(20, 4), tuned_params, 5)
    assert len(tuned.result.history) == 3 and tuned.trainable_parameters > 0
    assert tuned.config.provenance == config.provenance  # the registered model names its base
    save_text_model(tmp_path / "tuned", tuned.model, tokenizer, tuned.config)
    load_text_model(tmp_path / "tuned")


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_continued_pretraining_keeps_the_checkpoint_s_provenance(kind, tiny_checkpoints) -> None:
    """Domain-adaptive pretraining: the checkpoint with an LM head and its own tokenizer (the
    GPT-2's, which has no pad token, pads with EOS)."""
    checkpoint = tiny_checkpoints[kind]
    params = lm_params(kind, pretrained=str(checkpoint), epochs=2)
    run = pretrain(params, [split(60, 1)], split(24, 2), [split(24, 2)])
    assert run.config.provenance["pretrained"] == str(checkpoint)
    assert len(run.config.provenance["sha256"]) == 64
    assert run.config.trained_on["objective"] == OBJECTIVE[kind]
    assert run.model.hf.config.pad_token_id == run.tokenizer.pad_token_id is not None
    assert run.result.history[-1].val_loss < run.result.history[0].val_loss


def test_bad_inputs_are_one_line_errors(tokenizers, tiny_checkpoints) -> None:
    data = [split(60, 1)], split(24, 2), [split(24, 2)]
    with pytest.raises(DataError, match="less than one block of 32"):
        pretrain(
            lm_params("bert"), [split(2, 1)], split(24, 2), [], tokenizer_dir=tokenizers["bert"]
        )
    with pytest.raises(ParamsError, match="train.block_size: 100 is above the 64 positions"):
        pretrain(lm_params("bert", block_size=100), *data, tokenizer_dir=tokenizers["bert"])
    with pytest.raises(ParamsError, match="train.objective: mlm needs an encoder"):
        pretrain(lm_params("bert").model_copy(update={"model": lm_params("gpt2").model}), *data,
                 tokenizer_dir=tokenizers["gpt2"])  # fmt: skip
    clm_on_bert = lm_params("bert", objective="clm")
    with pytest.raises(ParamsError, match="train.objective: clm needs a decoder"):
        pretrain(clm_on_bert, *data, tokenizer_dir=tokenizers["bert"])
    with pytest.raises(ParamsError, match="train.objective: clm needs a decoder"):
        pretrain(lm_params("gpt2", pretrained=str(tiny_checkpoints["bert"])), *data)
    with pytest.raises(ModelError, match="no tokenizer"):
        pretrain(lm_params("bert"), *data, tokenizer_dir=Path("/nonexistent/tokenizer"))
    with pytest.raises(ParamsError, match="train.objective: mlm needs model.arch: hf"):
        parse_params({"train": {"objective": "mlm"}})
    unknown = lm_params("bert").model_dump(by_alias=True)
    unknown["model"]["hf"]["model_type"] = "nope"
    with pytest.raises(ParamsError, match="model.hf.model_type: 'nope' is not a model family"):
        pretrain(parse_params(unknown), *data, tokenizer_dir=tokenizers["bert"])
    with pytest.raises(ParamsError, match="hidden_size 30 must be a multiple of num_heads 4"):
        parse_params({"model": {"hf": {"hidden_size": 30, "num_heads": 4}}})
    with pytest.raises(ParamsError, match="model.arch: hf needs model.pretrained"):
        parse_params({"model": {"arch": "hf"}})  # classify from scratch: nothing to classify with


def test_params_defaults() -> None:
    params = parse_params({})
    assert params.train.objective == "classify"
    assert (params.train.mlm_probability, params.train.block_size, params.train.pack) == (
        0.15, None, True,
    )  # fmt: skip
    assert params.model.hf.model_type == "bert"
    scratch = lm_params("gpt2")
    assert scratch.model.arch_options()["hf"]["model_type"] == "gpt2"
    config = pretraining.hf_config(scratch.model.hf, gpt2_tokenizer())
    assert (config.n_embd, config.n_layer, config.n_head, config.n_inner) == (32, 2, 2, 64)
    assert config.n_positions == 64


def test_evaluate_compares_with_the_checkpoint_before_pretraining(tiny_checkpoints) -> None:
    """Domain-adaptive pretraining's control: the downloaded checkpoint as it was, fine-tuned
    on each draw's shots and seed; evaluate.json gets its block and the gain over it, and the
    report says whether pretraining here helped."""
    from stages.core.evaluation.baselines import Draw
    from stages.core.evaluation.metrics import scores
    from stages.core.evaluation.report import _adaptive_lines, _models_table
    from stages.core.evaluation.results import evaluation_metrics
    from stages.core.evaluation.scoring import Scored
    from stages.core.evaluation.text_scoring import checkpoint_draws, score_text_model
    from stages.core.modeling.finetuning import sample_shots
    from stages.core.modeling.text import load_pretrained

    params = lm_params("bert", pretrained=str(tiny_checkpoints["bert"]), epochs=1)
    params = params.model_copy(
        update={
            "evaluate": params.evaluate.model_copy(update={"draws": 2, "bootstrap_resamples": 50}),
            "finetune": params.finetune.model_copy(update={"shots_per_class": 6, "epochs": 2}),
        }
    )
    target = {"train": split(40, 3), "val": split(16, 4), "test": split(20, 5)}
    checkpoint = load_pretrained(params.model, ["neg", "pos"], TEXT)
    draws = checkpoint_draws(checkpoint[2], target, params)
    assert len(draws) == 2
    # Draw 1 is the checkpoint itself fine-tuned on draw 1's shots with seed finetune.seed + 1.
    seed = params.finetune.seed + 1
    shots = sample_shots(target["train"], 6, seed)
    run = finetune_text(*checkpoint, shots, target["val"], params, seed)
    expected = score_text_model(run.model, checkpoint[1], run.config, target["test"]).pairs
    pd.testing.assert_frame_equal(draws[1], expected)
    assert draws[0]["actual"].tolist() == target["test"][LABEL].tolist()

    # The fine-tuned model here: every row right on draw 0, every row wrong on draw 1.
    right = pd.DataFrame({"actual": draws[0]["actual"], "predicted": draws[0]["actual"]})
    wrong = right.assign(predicted=["pos" if a == "neg" else "neg"
                                    for a in right["actual"]])  # fmt: skip
    proba = torch.nn.functional.one_hot(
        torch.tensor([["neg", "pos"].index(a) for a in right["actual"]]), 2
    ).double().numpy()  # fmt: skip
    metrics = evaluation_metrics(
        base=None,
        finetuned=Scored(pairs=right, proba=proba, classes=["neg", "pos"]),
        draws=[
            Draw(seed=5, finetuned=right, scratch=wrong, sklearn=wrong),
            Draw(seed=6, finetuned=wrong, scratch=wrong, sklearn=wrong),
        ],  # fmt: skip
        zero_shot=None,
        params=params.evaluate,
        checkpoint=draws,
    )
    checkpoint_accuracy = [scores(pairs)["accuracy"] for pairs in draws]
    adaptive = metrics["adaptive_pretraining"]
    assert adaptive["finetuned_mean"] == 0.5
    assert adaptive["checkpoint_mean"] == pytest.approx(sum(checkpoint_accuracy) / 2, abs=1e-6)
    assert adaptive["gain_mean"] == pytest.approx(0.5 - sum(checkpoint_accuracy) / 2, abs=1e-6)
    assert metrics["checkpoint"]["accuracy"] == pytest.approx(checkpoint_accuracy[0], abs=1e-6)
    lines = _adaptive_lines(metrics)
    assert "Pretraining the checkpoint on this corpus first" in lines[1]
    assert "over 2 draws" in lines[1]
    table = _models_table(metrics, 6, params, text=True)
    assert (
        sum(line.startswith("| checkpoint | the checkpoint before pretraining") for line in table)
        == 1
    )
    # Without the control (no checkpoint pretrained here) there is no such row or sentence.
    del metrics["checkpoint"], metrics["adaptive_pretraining"]
    assert not _adaptive_lines(metrics)
    assert not any(
        line.startswith("| checkpoint |") for line in _models_table(metrics, 6, params, True)
    )


def test_the_tokenizer_kind_must_fit_the_model_source(tiny_checkpoints) -> None:
    """From scratch needs a tokenizer trained on the corpus; a checkpoint keeps its own."""
    scratch = lm_params("bert").model_dump(mode="json", by_alias=True)
    scratch["model"]["tokenizer"]["kind"] = "pretrained"
    with pytest.raises(ParamsError, match="model.tokenizer.kind: pretraining from scratch"):
        parse_params(scratch)
    checkpoint = lm_params("bert", pretrained=str(tiny_checkpoints["bert"]))
    checkpoint = checkpoint.model_dump(mode="json", by_alias=True)
    checkpoint["model"]["tokenizer"]["kind"] = "wordpiece"
    with pytest.raises(ParamsError, match="model.tokenizer.kind: wordpiece trains a new vocab"):
        parse_params(checkpoint)
