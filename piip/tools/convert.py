"""Convert an official PIIP checkpoint (github.com/OpenGVLab/PIIP) into a piip checkpoint.

    python -m piip.tools.convert SRC OUT experiment=coco_piip_sbl_1568_896_672
    python -m piip.tools.convert SRC OUT model=piip_sbl task=coco resolution=1568_896_672 [trust_pickle=true]

SRC: the file as released (mmdet/mmseg `state_dict`, the classification code's `model`, a DeepSpeed
`mp_rank_00_model_states.pt` or its folder). The other arguments compose the run as `train.py` would; the
checkpoint must fit that model exactly (every key placed, every shape equal), or nothing is written and the
mismatches are listed. OUT is then used as it is: `python evaluate.py ckpt_path=OUT data.root=…`,
`python train.py … init_from=OUT`, `python -m piip.tools.predict ckpt_path=OUT image=…`.
"""

from __future__ import annotations

import sys

from piip.errors import ConfigError
from piip.run.cli import quote_resolution_overrides, run_tool
from piip.run.convert import convert

USAGE = (
    "usage: python -m piip.tools.convert SRC OUT [experiment=…] [model=… task=… resolution=…] "
    "[trust_pickle=true]"
)


def main(argv: list[str] | None = None) -> int:
    args = quote_resolution_overrides(list(sys.argv[1:] if argv is None else argv))
    positional = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a and not a.startswith("trust_pickle=")]
    trust = any(a.lower() in ("trust_pickle=true", "trust_pickle=1") for a in args)
    if len(positional) != 2:
        raise ConfigError(f"expected the paths SRC and OUT, got {len(positional)}: {positional}; {USAGE}")
    src, out = positional
    report = convert(src, out, [*overrides, "logger=none"], trust_pickle=trust)
    print(f"wrote {report.out}: {report.tensors} tensors for model={report.model}")
    if report.official_config:
        print(f"official config: {report.official_config}")
    for key, why in sorted(report.unused.items()):
        print(f"not used by the official model either: {key} ({why})")
    print(f"next: python evaluate.py ckpt_path={report.out} data.root=/path/to/data")
    return 0


if __name__ == "__main__":
    run_tool("convert", main)
