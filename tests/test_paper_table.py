"""Every params/FLOPs row of the paper's released tables (PAPER.md §4.4), counted with the paper protocol."""

import pytest

from piip.tools.paper_table import ROWS, count_row, relative_error

TOLERANCE = 0.02


# Rows counted by default: one per task and kind of backbone (single-branch baseline; 3 and 4 ViT branches;
# InternViT-6B; ConvNeXt and ViT mixed; the DINO, segmentation, classification and LLaVA protocols). The other
# rows run the same counting code on other models and sizes (5-10 s each on 2 cores): `slow`.
DEFAULT_ROWS = {
    "vit_b-coco-1024",
    "piip_tsb-coco-1120_896_448",
    "piip_tsbl-coco-1344_896_672_448",
    "piip_h6b-coco-1024_512",
    "piip_ct_vs_cb-coco-1024_672_448",
    "piip_sbl_384-coco_dino-1792_1120_672",
    "piip_h6b-ade20k-512_192",
    "piip_tsb-imagenet-368_192_128",
    "piip_llava_cnxb_clipl_640_224-llava-640_224",
}


def row_id(row) -> str:
    return f"{row.model}-{row.task}-{row.resolution}"


def rows_with_representatives_by_default() -> list:
    return [
        pytest.param(row, marks=[] if row_id(row) in DEFAULT_ROWS else [pytest.mark.slow], id=row_id(row))
        for row in ROWS
    ]


def test_every_default_row_exists():
    assert {row_id(row) for row in ROWS} >= DEFAULT_ROWS


@pytest.mark.parametrize("row", rows_with_representatives_by_default())
def test_paper_row_within_two_percent(row):
    params, gflops = count_row(row)
    if row.expected_gflops is None:  # the README gives no figures: the row is only counted
        assert row.params_m is None and params > 0 and gflops > 0, (params, gflops, row)
        return
    assert relative_error(gflops, row.expected_gflops) < TOLERANCE, (gflops, row)
    if row.expected_params_m is not None:
        assert relative_error(params, row.expected_params_m) < TOLERANCE, (params, row)


@pytest.mark.slow
def test_readme_13b_figures_are_the_7b_ones():
    """The two rows we check against PAPER.md's recount really differ from the README (not a silent pass)."""
    flagged = [r for r in ROWS if r.protocol_gflops is not None and r.gflops is not None]
    assert len(flagged) == 2
    for row in flagged:
        _, gflops = count_row(row)
        assert relative_error(gflops, row.gflops) > 0.1


def test_dino_rows_are_checked_against_the_recount():
    """The README gives the DINO rows AP only: they are held to PAPER.md §4.4's recount, params too."""
    dino = [r for r in ROWS if r.task == "coco_dino"]
    assert len(dino) == 3
    assert all(r.gflops is None and r.params_m is None for r in dino)
    assert all(r.expected_gflops is not None and r.expected_params_m is not None for r in dino)
