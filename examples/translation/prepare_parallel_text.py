"""Moses-tokenize and lowercase a folder of parallel text once, into a folder of the same layout.

The folder holds one file per split and language, ``NAME.<source_lang>`` and
``NAME.<target_lang>``, one sentence per line (fairseq's layout, read by ``--data_dir``). The
result is what ``run_translation.py --moses_tokenize`` computes on every load, as
``prepare-iwslt14.sh`` prepares IWSLT'14, so that the runs on it skip that step.

    python examples/translation/prepare_parallel_text.py ../shared/data/multi30k_de_en \\
        out/multi30k_tok
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from translation_data import moses_tokenize_lowercase, read_parallel_dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="Folder of parallel text files.")
    parser.add_argument("output_dir", type=Path, help="Where the prepared files go.")
    parser.add_argument("--source_lang", default="de")
    parser.add_argument("--target_lang", default="en")
    args = parser.parse_args(argv)
    languages = (args.source_lang, args.target_lang)
    prepared = moses_tokenize_lowercase(read_parallel_dir(args.data_dir, *languages), *languages)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for split, dataset in prepared.items():
        for language in languages:
            lines = [pair[language] for pair in dataset["translation"]]
            path = args.output_dir / f"{split}.{language}"
            path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


if __name__ == "__main__":
    main()
