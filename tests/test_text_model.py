"""Pretrained text classifiers (model.arch: hf) on tiny BERT and GPT-2 checkpoints built in the
session (tests/tiny_text.py): loading both families with the same code, the pad-token fallback,
training through the one fit(), the strategies, LoRA's merged reload parity, the saved
directory, and each bad input as one line naming its key."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_text import MAX_POSITIONS, labelled_texts

from stages.core.common.errors import ModelError, ParamsError
from stages.core.common.params import LoraParams, ModelParams, parse_params
from stages.core.engine.inference import predict_proba
from stages.core.engine.training import FitOptions, fit
from stages.core.modeling import text, text_head
from stages.core.modeling.tokenization import label_indices, tokenize

CLASSES = ["neg", "pos"]
FAMILIES = ["bert", "gpt2"]
OPTIONS = FitOptions(
    epochs=8,
    batch_size=16,
    lr=6e-3,
    weight_decay=0.01,
    seed=0,
    patience=None,
    device="cpu",
    schedule="linear",
    warmup_epochs=0.5,
    optimizer="adamw",
)


def _load(folder: Path, **params):
    return text.load_pretrained(
        ModelParams(arch="hf", pretrained=str(folder), **params), CLASSES, "text"
    )


def _data(tokenizer, max_length: int, n: int, seed: int):
    texts, labels = labelled_texts(n, seed)
    return tokenize(tokenizer, texts, max_length, label_indices(labels, CLASSES)).batches


@pytest.fixture(scope="module")
def trained(tiny_checkpoints):
    """Each family fine-tuned (full) on texts whose label is in their words, with its history."""
    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model, tokenizer, config = _load(tiny_checkpoints[family])
        train, val = (
            _data(tokenizer, config.max_length, 160, 1),
            _data(tokenizer, config.max_length, 48, 2),
        )
        result = fit(model, train, val, OPTIONS)
        out[family] = (model, tokenizer, config, result, val)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_both_families_learn_from_words(trained, family) -> None:
    model, _, config, result, val = trained[family]
    assert config.model_type == family
    assert result.history[-1].train_loss < 0.5 * result.history[0].train_loss
    assert result.history[-1].val_accuracy >= 0.9
    assert (predict_proba(model, val).argmax(1) == val.y).float().mean() >= 0.9


def test_the_head_is_found_from_the_model(tiny_checkpoints) -> None:
    assert _load(tiny_checkpoints["bert"])[2].head == ["classifier"]
    assert _load(tiny_checkpoints["gpt2"])[2].head == ["score"]


def test_gpt2_without_a_pad_token_pads_with_eos(tiny_checkpoints, trained) -> None:
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny_checkpoints["gpt2"]).pad_token is None  # as shipped
    model, tokenizer, _, _, _ = trained["gpt2"]
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert model.hf.config.pad_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_does_not_change_a_prediction(trained, family) -> None:
    """A short text padded beside a long one gets the prediction it gets alone: the mask (BERT)
    and the last-non-pad-token pooling (GPT-2) ignore the padding."""
    model, tokenizer, config, _, _ = trained[family]
    short, long = "good", "the movie was very bad and the food was really awful this day"
    together = text.predict_texts(model, tokenizer, [short, long], config.max_length)
    alone = text.predict_texts(model, tokenizer, [short], config.max_length)
    assert torch.allclose(together[0], alone[0], atol=1e-6)
    assert together[0].argmax() == 1 and together[1].argmax() == 0


def test_long_texts_are_truncated_and_counted(trained) -> None:
    _, tokenizer, _, _, _ = trained["bert"]
    texts = ["good day", " ".join(["good"] * 40), "bad " * 3]
    tokens = tokenize(tokenizer, texts, 10)
    assert tokens.truncated == 1
    assert tokens.batches.lengths.tolist() == [4, 10, 5]
    assert tokens.batches.ids[1, 9] == tokenizer.sep_token_id  # the tokenizer's own truncation


def test_max_length_defaults_to_the_models_positions(tiny_checkpoints) -> None:
    assert _load(tiny_checkpoints["bert"])[2].max_length == MAX_POSITIONS
    assert _load(tiny_checkpoints["gpt2"], max_length=20)[2].max_length == 20


def test_provenance_records_the_source_and_its_weights(tiny_checkpoints) -> None:
    folder = tiny_checkpoints["bert"]
    _, _, config = _load(folder, revision="main")
    expected = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert config.provenance == {"pretrained": str(folder), "revision": "main", "sha256": expected}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_merged_reload_gives_identical_predictions(tiny_checkpoints, tmp_path, family) -> None:
    """LoRA with the head in modules_to_save: the saved (merged) model, reloaded with our
    loader and with transformers alone, predicts exactly what the merged model did; the head is
    the trained one, not a random one (the anchors' failure)."""
    from transformers import AutoModelForSequenceClassification

    model, tokenizer, config = _load(tiny_checkpoints[family])
    head = config.head[0]
    before = {k: v.clone() for k, v in model.hf.get_submodule(head).state_dict().items()}
    torch.manual_seed(1)
    lora = text.adapt(model, config, "lora", LoraParams(rank=4, alpha=8, dropout=0.0))
    train, val = (
        _data(tokenizer, config.max_length, 64, 3),
        _data(tokenizer, config.max_length, 24, 4),
    )
    fit(lora, train, val, replace(OPTIONS, epochs=2))
    unmerged = predict_proba(lora, val)
    merged = text.merge(lora)
    expected = predict_proba(merged, val)
    assert torch.allclose(unmerged, expected, atol=1e-6)  # merging changes only rounding

    saved = text.save_text_model(tmp_path / "model", lora, tokenizer, config)
    assert saved.weights_sha256 == text.weights_sha256(tmp_path / "model")
    reloaded, reloaded_tokenizer, reloaded_config = text.load_text_model(tmp_path / "model")
    assert reloaded_config == saved
    texts, _ = labelled_texts(24, 4)
    assert torch.equal(
        text.predict_texts(reloaded, reloaded_tokenizer, texts, saved.max_length), expected
    )
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert torch.equal(predict_proba(text.TextClassifier(plain), val), expected)
    assert plain.config.id2label == {0: "neg", 1: "pos"}
    trained_head = reloaded.hf.get_submodule(head).state_dict()
    assert all(not torch.equal(trained_head[k], before[k]) for k in before)
    assert not any("lora" in key for key in plain.state_dict())


def test_strategies_set_what_trains(tiny_checkpoints) -> None:
    model, _, config = _load(tiny_checkpoints["bert"])
    text.adapt(model, config, "head")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["hf.classifier.weight", "hf.classifier.bias"]
    text.adapt(model, config, "full")
    assert all(p.requires_grad for p in model.parameters())
    lora = text.adapt(model, config, "lora", LoraParams(rank=2))
    names = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in name or "classifier" in name for name in names)
    assert any("query" in name for name in names) and any("value" in name for name in names)
    assert not any("key" in name for name in names)  # BERT's default: query and value


def test_gpt2_lora_defaults_to_c_attn(tiny_checkpoints) -> None:
    model, _, config = _load(tiny_checkpoints["gpt2"])
    lora = text.adapt(model, config, "lora", LoraParams(rank=2))
    names = [name for name, p in lora.named_parameters() if p.requires_grad and "lora_" in name]
    assert names and all("c_attn" in name for name in names)


def test_a_new_head_keeps_the_body(trained) -> None:
    model, _, config, _, _ = trained["bert"]
    new, new_config = text.with_new_head(model, config, ["a", "b", "c"], seed=3)
    assert new_config.classes == ["a", "b", "c"] and new.hf.config.num_labels == 3
    assert new.hf.classifier.out_features == 3
    body, new_body = model.hf.bert.state_dict(), new.hf.bert.state_dict()
    assert all(torch.equal(body[k], new_body[k]) for k in body)
    again, _ = text.with_new_head(model, config, ["a", "b", "c"], seed=3)
    assert torch.equal(again.hf.classifier.weight, new.hf.classifier.weight)  # seeded


def test_gradient_checkpointing_trains(tiny_checkpoints) -> None:
    model, tokenizer, config = _load(tiny_checkpoints["gpt2"], gradient_checkpointing=True)
    assert model.hf.is_gradient_checkpointing
    data = _data(tokenizer, config.max_length, 32, 5)
    result = fit(model, data, data, replace(OPTIONS, epochs=1))
    assert result.history[0].train_loss > 0


def test_save_replaces_the_directory_and_a_tampered_one_is_refused(trained, tmp_path) -> None:
    model, tokenizer, config, _, _ = trained["gpt2"]
    directory = tmp_path / "models" / "base"
    directory.mkdir(parents=True)
    (directory / "stale.txt").write_text("from an older run")
    text.save_text_model(directory, model, tokenizer, config)
    assert not (directory / "stale.txt").exists()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["base"]
    assert {"config.json", "model.safetensors", "tokenizer.json", text.TEXT_META} <= {
        p.name for p in directory.iterdir()
    }
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ModelError, match="sha256 .* is not the"):
        text.load_text_model(directory)


# --- bad input: one line naming the key ---------------------------------------------------


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_a_missing_checkpoint_folder(tmp_path) -> None:
    with pytest.raises(ModelError) as caught:
        _load(tmp_path / "models" / "nothing-here")
    assert _one_line(caught).startswith("model.pretrained: ")
    assert "no such checkpoint folder" in str(caught.value)


def test_a_folder_that_is_no_checkpoint(tmp_path) -> None:
    with pytest.raises(ModelError, match="has no config.json"):
        _load(tmp_path)


def test_a_hub_id_offline(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError) as caught:
        text.load_pretrained(
            ModelParams(arch="hf", pretrained="nobody/no-such-model"), CLASSES, "text"
        )
    message = _one_line(caught)
    assert message.startswith("model.pretrained: 'nobody/no-such-model' is not a local folder")
    assert "HF_HUB_OFFLINE=1" in message


def test_a_tokenizer_larger_than_the_embeddings(tiny_checkpoints, tmp_path) -> None:
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_checkpoints["bert"], mixed)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoints["gpt2"] / name, mixed / name)
    with pytest.raises(ModelError) as caught:
        _load(mixed)
    assert "the tokenizer has 300 tokens but the model's embeddings hold" in _one_line(caught)


def test_max_length_above_the_positions(tiny_checkpoints) -> None:
    with pytest.raises(ParamsError) as caught:
        _load(tiny_checkpoints["bert"], max_length=MAX_POSITIONS + 1)
    assert _one_line(caught) == (
        f"model.max_length: {MAX_POSITIONS + 1} is above the {MAX_POSITIONS} positions of this "
        f"bert model; set it to {MAX_POSITIONS} or less"
    )


@pytest.mark.parametrize(("family", "layer"), [("bert", "query"), ("gpt2", "c_attn")])
def test_a_lora_target_that_matches_nothing(tiny_checkpoints, family, layer) -> None:
    model, _, config = _load(tiny_checkpoints[family])
    with pytest.raises(ParamsError) as caught:
        text.adapt(model, config, "lora", LoraParams(target_modules=["qkv"]))
    message = _one_line(caught)
    assert message.startswith("finetune.lora.target_modules: 'qkv' matches no linear layer")
    assert layer in message


def test_hf_params() -> None:
    params = parse_params({"model": {"arch": "hf", "pretrained": "data/models/bert"}})
    assert params.model.trust_remote_code is False and params.train.objective == "classify"
    options = text.text_fit_options(params.section("train") | {"schedule": "linear"})
    assert (options.optimizer, options.schedule) == ("adamw", "linear")
    with pytest.raises(ParamsError, match="model.arch: hf needs model.pretrained"):
        parse_params({"model": {"arch": "hf"}})
    with pytest.raises(ParamsError, match="train.objective: none needs model.arch: hf"):
        parse_params({"train": {"objective": "none"}})
    with pytest.raises(
        ParamsError, match=r"^params.yaml: finetune.pooling applies to arch hf only \(arch is"
    ):
        parse_params({"finetune": {"pooling": "mean"}})
    with pytest.raises(
        ParamsError, match="^params.yaml: evaluate.scratch_strategy: same applies to arch hf"
    ):
        parse_params({"evaluate": {"scratch_strategy": "same"}})
    with pytest.raises(ParamsError, match="^params.yaml: finetune.pooling: "):
        parse_params({"finetune": {"pooling": "max"}})


def test_lora_resumes_after_a_kill_to_the_same_bytes(tiny_checkpoints, tmp_path) -> None:
    """A killed LoRA run resumes from its checkpoint (adapters, head, AdamW, the schedule,
    dropout's RNG) and ends with the weights of a run that was never interrupted."""
    from stages.core.engine.checkpoints import Checkpoints

    class Killed(Exception):
        pass

    def kill_at_3(stats) -> None:
        if stats.epoch == 3:
            raise Killed

    options = replace(OPTIONS, epochs=5, grad_accum=2, grad_clip=1.0, batch_size=8)

    def run(seed: int, **kwargs):
        torch.manual_seed(seed)  # the fresh head, LoRA's A matrices, dropout
        model, tokenizer, config = _load(tiny_checkpoints["gpt2"])
        lora = text.adapt(model, config, "lora", LoraParams(rank=2))
        data = _data(tokenizer, config.max_length, 40, 6)
        fit(lora, data, data, options, **kwargs)
        return {k: v.clone() for k, v in text.merge(lora).state_dict().items()}

    expected = run(0)
    with pytest.raises(Killed):
        run(0, on_epoch=kill_at_3, checkpoints=Checkpoints(tmp_path, "k", 2, "finetune"))
    resumed = run(99, checkpoints=Checkpoints(tmp_path, "k", 2, "finetune"))
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_head_strategy_trains_on_cached_embeddings(tiny_checkpoints, family) -> None:
    """The frozen body runs once; the head trains on its outputs and, put back in the whole
    model, scores the val texts as the cached training measured."""
    torch.manual_seed(0)
    model, tokenizer, config = _load(tiny_checkpoints[family])
    text.adapt(model, config, "head")
    body = {k: v.clone() for k, v in model.hf.base_model.state_dict().items()}
    train, val = (
        _data(tokenizer, config.max_length, 96, 7),
        _data(tokenizer, config.max_length, 32, 8),
    )
    cached = text_head.head_inputs(model, config, val, batch_size=8)
    assert cached is not None and len(cached) == 32
    result = text_head.fit_head_on_embeddings(
        model, config, train, val, replace(OPTIONS, epochs=30, lr=0.05)
    )
    assert result is not None
    assert result.trainable_parameters == sum(
        p.numel() for p in model.hf.get_submodule(config.head[0]).parameters()
    )
    assert result.history[-1].train_loss < result.history[0].train_loss
    proba = predict_proba(model, val)
    accuracy = float((proba.argmax(1) == val.y).float().mean())
    assert accuracy == pytest.approx(result.history[-1].val_accuracy)
    assert all(torch.equal(v, body[k]) for k, v in model.hf.base_model.state_dict().items())


def test_a_head_of_several_modules_is_not_cached(tiny_checkpoints) -> None:
    model, tokenizer, config = _load(tiny_checkpoints["bert"])
    data = _data(tokenizer, config.max_length, 8, 9)
    assert (
        text_head.head_inputs(model, config.replace(head=["classifier", "dropout"]), data, 4)
        is None
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapter_form_reloads_with_its_head(tiny_checkpoints, tmp_path, family) -> None:
    """form both keeps the adapter (head in modules_to_save) beside the merged weights; the
    adapter on its base predicts what the LoRA model did before saving, and so does the merged
    form; form adapter alone writes no merged weights and loads as an adapter."""
    folder = tiny_checkpoints[family]
    model, tokenizer, config = _load(folder)
    torch.manual_seed(2)
    lora = text.adapt(model, config, "lora", LoraParams(rank=4, alpha=8, dropout=0.0))
    train, val = (
        _data(tokenizer, config.max_length, 48, 10),
        _data(tokenizer, config.max_length, 16, 11),
    )
    fit(lora, train, val, replace(OPTIONS, epochs=2))
    expected = predict_proba(lora, val)
    adapter_state = {k: v.clone() for k, v in lora.hf.state_dict().items()}

    saved = text.save_text_model(tmp_path / "both", lora, tokenizer, config, "both", folder)
    assert saved.adapter["base"] == str(folder) and saved.weights_sha256
    assert (tmp_path / "both" / text.ADAPTER_DIR / "adapter_model.safetensors").is_file()
    adapted, _, _ = text.load_text_model(tmp_path / "both", form="adapter")
    assert torch.equal(predict_proba(adapted, val), expected)
    merged, _, _ = text.load_text_model(tmp_path / "both")
    assert torch.allclose(predict_proba(merged, val), expected, atol=1e-6)

    # The same adapter again, saved alone.
    model, tokenizer, config = _load(folder)
    lora = text.adapt(model, config, "lora", LoraParams(rank=4, alpha=8, dropout=0.0))
    lora.hf.load_state_dict(adapter_state)
    alone = text.save_text_model(tmp_path / "adapter", lora, tokenizer, config, "adapter", folder)
    assert alone.weights_sha256 == "" and not (tmp_path / "adapter" / "model.safetensors").exists()
    reloaded, _, _ = text.load_text_model(tmp_path / "adapter")
    assert torch.equal(predict_proba(reloaded, val), expected)


def test_scratch_and_body_lr_groups(trained) -> None:
    model, _, config, _, _ = trained["bert"]
    scratch, _ = text.with_new_head(model, config, CLASSES, seed=4, keep_body=False)
    assert not torch.equal(
        scratch.hf.bert.embeddings.word_embeddings.weight,
        model.hf.bert.embeddings.word_embeddings.weight,
    )
    assert text.optimizer_groups(model, config, None) is None
    body, head = text.optimizer_groups(model, config, 1e-4)
    assert body["lr"] == 1e-4 and "lr" not in head
    assert [p.shape for p in head["params"]] == [(2, 16), (2,)]
    assert len(body["params"]) + 2 == len(list(model.parameters()))


def _mean_model(folder: Path, seed: int = 5):
    """``folder``'s checkpoint with a fresh head that reads the mean of the body's states."""
    model, tokenizer, config = _load(folder)
    mean, mean_config = text.with_new_head(model, config, CLASSES, seed, pooling="mean")
    return mean, tokenizer, mean_config


@pytest.mark.parametrize("family", FAMILIES)
def test_mean_pooling_averages_the_states_of_the_real_tokens(tiny_checkpoints, family) -> None:
    """The logits are the head on the average of the last hidden states over the text's own
    tokens (from HF's full forward, one text at a time, unpadded), whichever texts share the
    batch; the architecture's own pooling gives other logits from the same weights."""
    model, tokenizer, config = _mean_model(tiny_checkpoints[family])
    assert config.pooling == "mean"
    texts = ["good", "the movie was very bad and the food was really awful this day"]
    batched = text.predict_texts(model, tokenizer, texts, config.max_length).float()
    head = model.hf.get_submodule(config.head[0])
    model.eval()
    for row, one in zip(batched, texts, strict=True):
        ids = tokenizer(one, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            states = model.hf(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
            logits = head(states.mean(0, keepdim=True).unsqueeze(1))
        logits = logits[:, 0] if logits.dim() == 3 else logits
        assert torch.allclose(row, torch.softmax(logits[0], -1), atol=1e-5)
    own = text.TextClassifier(model.hf)  # the same weights read the architecture's way
    assert not torch.allclose(
        text.predict_texts(own, tokenizer, texts, config.max_length).float(), batched, atol=1e-4
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_mean_pooling_is_saved_and_cached_and_kept_by_lora(tiny_checkpoints, tmp_path, family):
    """A mean-pooled head trains on cached inputs (the fast head path), is saved with its
    pooling and reloads to the same predictions; under LoRA it survives the merge."""
    model, tokenizer, config = _mean_model(tiny_checkpoints[family])
    text.adapt(model, config, "head")
    train, val = (
        _data(tokenizer, config.max_length, 64, 12),
        _data(tokenizer, config.max_length, 16, 13),
    )
    result = text_head.fit_head_on_embeddings(
        model, config, train, val, replace(OPTIONS, epochs=20, lr=0.05)
    )
    assert result is not None and result.history[-1].train_loss < result.history[0].train_loss
    proba = predict_proba(model, val)
    accuracy = float((proba.argmax(1) == val.y).float().mean())
    assert accuracy == pytest.approx(result.history[-1].val_accuracy)
    text.save_text_model(tmp_path / "mean", model, tokenizer, config)
    loaded, _, loaded_config = text.load_text_model(tmp_path / "mean")
    assert loaded_config.pooling == "mean" and loaded.pooling == "mean"
    assert torch.equal(predict_proba(loaded, val), proba)

    model, tokenizer, config = _mean_model(tiny_checkpoints[family])
    torch.manual_seed(2)
    lora = text.adapt(model, config, "lora", LoraParams(rank=4, alpha=8, dropout=0.0))
    fit(lora, train, val, replace(OPTIONS, epochs=2))
    expected = predict_proba(lora, val)
    merged = text.merge(lora)
    assert merged.pooling == "mean" and not hasattr(merged.hf, "peft_config")
    assert torch.allclose(predict_proba(merged, val), expected, atol=1e-6)


def test_mean_pooling_needs_a_head_of_one_module() -> None:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    hf = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    )
    with pytest.raises(ParamsError) as caught:
        text.check_pooling(hf, "mean")
    assert str(caught.value) == (
        "finetune.pooling: mean needs a head of one module; this distilbert model's is 2 "
        "(pre_classifier, classifier)"
    )
    text.check_pooling(hf, None)  # the architecture's own pooling needs nothing
