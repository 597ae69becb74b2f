"""Convert a dictionary between libraries' formats: ours, dictionary_learning, SAELens, sparsify, OpenAI.

    python convert_dictionary.py SRC --to {ours,dictionary_learning,saelens,sparsify,openai} [--out DIR] [--params P]

SRC is anything ``--dictionary`` takes (a folder or file of any format, az://, hf://, openai:). The model and hook
come from SRC's files, or from the params where the format does not record them. The written dictionary gives
the same codes; a target that cannot hold it exactly is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

from dictlearn.cli import argument_parser
from dictlearn.errors import run_script
from dictlearn.formats.convert import TARGETS, write_as
from dictlearn.formats.detect import open_any
from dictlearn.params import load_params


def main() -> None:
    parser = argument_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("source", help="the dictionary to convert")
    parser.add_argument("--to", required=True, choices=TARGETS, help="the format to write")
    parser.add_argument("--out", help="output folder (default: <source>_<format> beside the source)")
    args = parser.parse_args()
    params = load_params(args.params)
    sae, info = open_any(args.source, params)
    if info.note:
        print(info.note)
    out = Path(args.out) if args.out else info.path.parent / f"{info.path.stem}_{args.to}"
    written = write_as(sae, info, args.to, out)
    print(f"{info.format} {sae.architecture} dictionary {info.path} -> {args.to}: {written}")


if __name__ == "__main__":
    run_script(main)
