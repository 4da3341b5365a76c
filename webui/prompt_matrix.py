"""A1111's Prompt matrix script: `a street|at night|in the rain` draws the prompt with every combination of the parts
after the first "|" (with neither, with each, with both: four pictures), then a grid of them with the parts each
row and column adds. The combinations run as the X/Y/Z plot's cells do (webui/runs.py)."""
from __future__ import annotations

from typing import Any, Callable

from webui.schemas import InvalidRequest, parse_request, random_seed, seed_after
from webui.xyz_plot import AXIS_TYPES, MAX_PLOT_CELLS, Axis, AxisType, Cell, Plot

MAX_PARTS = MAX_PLOT_CELLS.bit_length() - 1  # 2 ** 6 = 64 pictures
NONE_ADDED = "(none)"  # a grid label: the prompt alone
_PARTS_AXIS = AxisType("Prompt matrix", "text", lambda request, value: None, named=False)


def matrix_plot(request: dict[str, Any], *, parts_first: bool = False, different_seeds: bool = False,
                negative: bool = False, check: Callable[[dict], Any] = parse_request, joiner: str = ", ") -> Plot:
    """The combinations as a plot's cells: columns by the first half of the parts, rows by the rest (as A1111 lays
    them out). parts_first puts the parts before the prompt's first piece; negative combines the negative prompt's
    parts instead; one seed for all, picked once where it is random (-1), unless different_seeds; `joiner` joins the
    pieces (A1111's "Joining char": comma or space). Every request is checked by `check` before any runs."""
    field = "negative_prompt" if negative else "prompt"
    # As A1111, each piece without the spaces and commas around it; an empty part adds nothing, so it is left out.
    base, *parts = [piece.strip().strip(",").strip() for piece in (request.get(field) or "").split("|")]
    parts = [part for part in parts if part]
    what = "negative prompt" if negative else "prompt"
    if not parts:
        raise InvalidRequest(f"Prompt matrix: the {what} has no parts to combine; write them after \"|\", as in "
                             "\"a street|at night|in the rain\"")
    if len(parts) > MAX_PARTS:
        raise InvalidRequest(f"Prompt matrix: {len(parts)} parts make {2 ** len(parts)} pictures; at most {MAX_PARTS} "
                             f"parts ({MAX_PLOT_CELLS} pictures)")
    # One picture for each combination (A1111 fills its batches with them); one seed and variation seed for all.
    base_request = dict(request) | {"batch_size": 1, "n_iter": 1}
    for seed_field in ("seed", "subseed"):
        if base_request.get(seed_field, -1) == -1:
            base_request[seed_field] = random_seed()
    check(base_request | {field: base})  # what is wrong whatever the parts say is named plainly
    across = len(parts) - len(parts) // 2  # the first parts make the columns
    cells = []
    for combination in range(2 ** len(parts)):
        added = [part for bit, part in enumerate(parts) if combination >> bit & 1]
        cell = dict(base_request)
        cell[field] = joiner.join(piece for piece in (added + [base] if parts_first else [base] + added) if piece)
        if different_seeds:
            cell["seed"] = seed_after(base_request["seed"], combination)
        try:
            check(cell)
        except InvalidRequest as err:
            raise InvalidRequest(f"Prompt matrix, {' + '.join(added) or NONE_ADDED}: {err}") from None
        cells.append(Cell(combination & (2 ** across - 1), combination >> across, 0, cell))
    return Plot([_axis("X", parts[:across]), _axis("Y", parts[across:]), Axis("Z", AXIS_TYPES["Nothing"], [None])],
                cells)


def _axis(name: str, parts: list[str]) -> Axis:
    """An axis whose values name the parts each column (or row) adds."""
    if not parts:
        return Axis(name, AXIS_TYPES["Nothing"], [None])
    labels = [", ".join(part for bit, part in enumerate(parts) if index >> bit & 1) or NONE_ADDED
              for index in range(2 ** len(parts))]
    return Axis(name, _PARTS_AXIS, labels)
