"""Stage encode_public: public images -> scaled latents with the frozen public AE (see stages/encode.py)."""
from __future__ import annotations

from stages.common import stage_main
from stages.encode import INPUTS, OUTPUTS, run_encode


def run(params: dict, inputs: dict, outputs: dict) -> dict:
    return run_encode(params, inputs, outputs)


def main(argv=None) -> None:
    stage_main(run, inputs=INPUTS, outputs=OUTPUTS, argv=argv)


if __name__ == "__main__":
    main()
