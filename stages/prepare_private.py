"""Stage prepare_private: the private image set as Parquet + manifest + example grid (see stages/prepare.py)."""
from __future__ import annotations

from stages.common import stage_main
from stages.prepare import INPUTS, OUTPUTS, run_prepare


def run(params: dict, inputs: dict, outputs: dict) -> dict:
    return run_prepare(params, outputs, which="private")


def main(argv=None) -> None:
    stage_main(run, inputs=INPUTS, outputs=OUTPUTS, argv=argv)


if __name__ == "__main__":
    main()
