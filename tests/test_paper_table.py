"""Every params/FLOPs row of the paper's released tables (PAPER.md §4.4), counted with the paper protocol."""

import pytest

from piip.tools.paper_table import ROWS, count_row, relative_error

TOLERANCE = 0.02


def rows_with_one_per_model_and_task_by_default() -> list:
    """Every row; a model's further resolutions for the same task run the same code on other sizes, so they
    are `slow` (about 4 s each on 2 cores)."""
    seen, params = set(), []
    for row in ROWS:
        key = (row.model, row.task)
        marks = [pytest.mark.slow] if key in seen else []
        seen.add(key)
        params.append(pytest.param(row, marks=marks, id=f"{row.model}-{row.task}-{row.resolution}"))
    return params


@pytest.mark.parametrize("row", rows_with_one_per_model_and_task_by_default())
def test_paper_row_within_two_percent(row):
    params, gflops = count_row(row)
    if row.expected_gflops is None:  # the README gives no figures: the row is only counted
        assert row.params_m is None and params > 0 and gflops > 0, (params, gflops, row)
        return
    assert relative_error(gflops, row.expected_gflops) < TOLERANCE, (gflops, row)
    if row.expected_params_m is not None:
        assert relative_error(params, row.expected_params_m) < TOLERANCE, (params, row)


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
