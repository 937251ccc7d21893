"""The command line of a smoke run of the translation recipe (``examples/translation``)."""

from __future__ import annotations

from pathlib import Path


def smoke_argv(shared_data: Path, output_dir: Path, *extra: str) -> list[str]:
    """A tiny Transformer on 200 IWSLT'14 pairs; the test split doubles as validation."""
    return [
        f"--data_dir={shared_data / 'iwslt14_de_en' / 'tok'}",
        "--train_split=valid",
        "--validation_split=test",
        "--max_train_samples=160",
        "--max_eval_samples=12",
        "--max_predict_samples=6",
        "--bpe_vocab_size=400",
        "--d_model=32",
        "--encoder_layers=1",
        "--decoder_layers=1",
        "--attention_heads=2",
        "--ffn_dim=64",
        "--dropout=0.1",
        "--max_tokens=1000",
        f"--output_dir={output_dir}",
        "--do_train",
        "--do_eval",
        "--do_predict",
        "--predict_with_generate",
        "--generation_num_beams=5",
        "--generation_max_length=16",
        "--per_device_eval_batch_size=12",
        "--num_train_epochs=2",
        "--learning_rate=1e-2",
        "--lr_scheduler_type=inverse_sqrt",
        "--warmup_steps=4",
        "--adam_beta2=0.98",
        "--weight_decay=1e-4",
        "--label_smoothing_factor=0.1",
        "--max_grad_norm=0",
        "--logging_steps=1",
        "--save_strategy=no",
        "--report_to=none",
        "--use_cpu",
        "--disable_tqdm=true",
        "--seed=0",
        *extra,
    ]
