"""Stage tokenize: the pretraining corpus (data.corpus) read and validated -> data/corpus/;
a tokenizer trained on the pretraining texts (model.tokenizer: wordpiece or bpe) ->
models/tokenizer/. A run that trains none (no text, or kind pretrained) writes only
models/tokenizer/tokenizer_info.json saying why, without importing transformers."""

from stages.core.common.warm_start import run_stage_warm
from stages.core.tracking.runs import start_worker

# First, before the imports below: a warm server, when one runs, takes the stage over
# (stages/core/common/warm_start.py); else MLflow's worker process starts and imports mlflow
# on another core meanwhile.
if __name__ == "__main__":
    run_stage_warm()
    start_worker()


from stages.core.common import layout
from stages.core.common.cli import run_as_script
from stages.core.common.io import write_dir_atomic, write_json, write_parquet
from stages.core.common.params import load_params
from stages.core.data.corpus import build_corpus, pretraining_texts, texts_md5
from stages.core.modeling.tokenizer_training import (
    no_tokenizer_reason,
    save_tokenizer,
    save_untrained,
    tokenizer_info,
    train_tokenizer,
)
from stages.core.tracking.runs import stage_run
from stages.core.tracking.tags import set_tags


def main() -> None:
    params = load_params()
    data = params.section("data")
    sections = {
        "data": {k: data[k] for k in ("text_column", "corpus", "corpus_column", "corpus_sha256")},
        "validate": {"text_length": params.section("validate")["text_length"]},
        "model": {"tokenizer": params.model.tokenizer.model_dump(mode="json")},
    }
    with stage_run("tokenize", params.tracking.experiment, sections, pipeline_params=params) as run:
        if params.data.corpus is None:
            report = {"corpus": None, "note": "data.corpus is null: no corpus to validate"}
            write_dir_atomic(
                layout.CORPUS_DIR, lambda tmp: write_json(tmp / layout.CORPUS_REPORT.name, report)
            )
        else:
            corpus = build_corpus(params)
            report = {"corpus": corpus.report}

            def write(tmp) -> None:
                write_parquet(tmp / layout.CORPUS.name, corpus.clean)
                write_parquet(tmp / layout.CORPUS_REJECTED.name, corpus.rejected)
                write_json(tmp / layout.CORPUS_REPORT.name, report)

            write_dir_atomic(layout.CORPUS_DIR, write)
            run.log_metrics({"corpus": {k: v for k, v in corpus.report.items() if k != "source"}})
        reason = no_tokenizer_reason(params)
        if reason is not None:
            info = save_untrained(layout.TOKENIZER_DIR, reason)
        else:
            texts = pretraining_texts(params)
            digest = texts_md5(texts)
            tokenizer = train_tokenizer(texts, params.model.tokenizer)
            info = tokenizer_info(params.model.tokenizer, tokenizer, digest, len(texts))
            info = save_tokenizer(layout.TOKENIZER_DIR, tokenizer, info)
            run.log_metrics({"tokenizer_vocab_size": info["vocab_size"], "texts": len(texts)})
        run.log_artifacts(layout.TOKENIZER_INFO)
        lineage = {
            "tokenizer_md5": info.get("tokenizer_md5"),
            "corpus_md5": (report["corpus"] or {}).get("texts_md5"),
            "pretraining_texts_md5": info.get("texts_md5"),
        }
        run.send(set_tags, {k: v for k, v in lineage.items() if v is not None})
    if reason is not None:
        print(f"tokenize: no tokenizer trained: {reason}")
    else:
        print(
            f"tokenize: {info['kind']} tokenizer, {info['vocab_size']} tokens, trained on "
            f"{info['texts']} texts -> {layout.TOKENIZER_DIR}"
        )
    if report["corpus"] is not None:
        found = report["corpus"]
        print(
            f"tokenize: corpus {found['rows_clean']} of {found['rows_in']} texts kept "
            f"({found['quarantined']['in_val_or_test']} equal to a val/test text dropped) "
            f"-> {layout.CORPUS}"
        )


if __name__ == "__main__":
    run_as_script("tokenize", main)
