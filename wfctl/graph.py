"""Pictures of a workflow's DAG: a layered layout, and Mermaid, DOT and SVG text.

Pure: step ids, their dependencies and (for a run) their states in, text out.
No I/O and no clock, so every picture of a given graph is the same bytes.

Theory of operation (the layout, for SVG)
-----------------------------------------
Sugiyama's layered drawing, left to right, as Graphviz's `dot -Grankdir=LR`:

1. Layers by longest path: a step sits one layer right of its deepest
   dependency, so every edge points right (layer order respects edges).
2. An edge spanning several layers gets a dummy vertex in each layer between
   (up to a budget), so that it is routed through reserved room in each column
   and never through a box.
3. Order within each layer by the barycenter heuristic: alternate sweeps
   right and left, each sorting a layer by the mean position of its
   neighbours in the layer before; keep the order with the fewest crossings
   (counted exactly, by inversions).
4. Vertical positions: each layer is placed as close as possible (least
   squares, weighted toward dummies so long edges run straight) to the mean
   of its neighbours, keeping its order and a minimum gap: an isotonic
   regression (pool adjacent violators), exact and linear. The minimum gap
   within a layer and disjoint column x ranges mean boxes never overlap.
5. Edges run horizontally inside columns and as Bezier curves in the gaps
   between them, where there are no boxes.

Everything is iterative and near-linear, so 200 or 2,000 steps lay out in
well under a second.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape, quoteattr

if TYPE_CHECKING:
    from wfd.state import RunStatus, StepStatus
    from wfd.workflow import Workflow

FORMATS = ("mermaid", "dot", "svg")

# Step states in the order a step meets them; the colours every picture uses (fill, stroke).
STATES = ("PENDING", "READY", "RUNNING", "RETRY_WAIT", "SUCCEEDED", "FAILED", "SKIPPED",
          "CANCELLED")
COLOURS: dict[str, tuple[str, str]] = {
    "PENDING": ("#eceff1", "#90a4ae"),
    "READY": ("#bbdefb", "#1e88e5"),
    "RUNNING": ("#fff59d", "#f9a825"),
    "RETRY_WAIT": ("#ffe0b2", "#fb8c00"),
    "SUCCEEDED": ("#c8e6c9", "#43a047"),
    "FAILED": ("#ffcdd2", "#e53935"),
    "SKIPPED": ("#f5f5f5", "#bdbdbd"),
    "CANCELLED": ("#d7ccc8", "#6d4c41"),
}
NO_STATE = ("#ffffff", "#607d8b")  # a workflow file's steps have no state

# Geometry, in SVG px. Labels are monospace, so their width is known without a font.
FONT_PX = 12
CHAR_W = 7.3  # advance of a 12 px monospace glyph (DejaVu Sans Mono: 7.22)
BOX_H = 26.0
PAD_X = 10.0
GAP_Y = 12.0  # between two boxes of a layer
GAP_DUMMY = 6.0  # between an edge passing through a layer and its neighbours
GAP_X = 56.0  # between columns: where the edges curve
MARGIN = 16.0
MAX_LABEL = 40  # longer ids are cut with an ellipsis (the tooltip has them whole)
DUMMY_BUDGET = 20_000  # dummy vertices at most; longer edges beyond it are drawn direct
SWEEPS = 24


# ---- the graph ----------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One step: its id, dependencies, state (None for a file) and tooltip."""

    id: str
    deps: tuple[str, ...]
    state: str | None = None
    tip: str = ""


@dataclass(frozen=True)
class Graph:
    """What a picture shows: a title, steps in file order, the run's state if a run."""

    title: str
    nodes: tuple[Node, ...]
    state: str | None = None

    def edges(self) -> list[tuple[str, str]]:
        """(dependency, step) pairs, in file order; unknown dependencies left out."""
        known = {node.id for node in self.nodes}
        return [(dep, node.id) for node in self.nodes for dep in node.deps if dep in known]


def from_workflow(workflow: Workflow) -> Graph:
    return Graph(workflow.name, tuple(Node(step.id, tuple(step.depends_on))
                                      for step in workflow.steps))


def from_status(status: RunStatus) -> Graph:
    nodes = tuple(Node(sid, tuple(step.depends_on), step.state, step_tip(sid, step))
                  for sid, step in status.steps.items())
    return Graph(f"{status.name}  {status.run_id}  {status.state}", nodes, status.state)


def step_tip(step_id: str, step: StepStatus) -> str:
    tip = f"{step_id}: {step.state}, {step.attempts} attempt{'' if step.attempts == 1 else 's'}"
    if step.error:
        tip += f"\n{step.error}"
    return tip


# ---- layout -------------------------------------------------------------------------


@dataclass
class Box:
    id: str
    layer: int
    x: float
    y: float
    w: float
    h: float


@dataclass
class Route:
    """An edge's way: box right side, then (column exit, next column entry) pairs, then
    the target box's left side; horizontal runs inside columns, curves between."""

    src: str
    dst: str
    points: list[tuple[float, float]]


@dataclass
class Layout:
    boxes: dict[str, Box]
    routes: list[Route]
    width: float
    height: float
    layers: list[list[str]] = field(default_factory=list)  # step ids by layer, in order


def label(step_id: str) -> str:
    return step_id if len(step_id) <= MAX_LABEL else step_id[:MAX_LABEL - 1] + "…"


def box_width(step_id: str) -> float:
    return round(len(label(step_id)) * CHAR_W + 2 * PAD_X, 1)


def longest_path_layers(deps: Sequence[Sequence[int]]) -> list[int]:
    """Layer of each vertex: 0 without dependencies, else one more than its deepest
    dependency (Kahn's order, iterative). Vertices on a cycle (never in a validated
    workflow) stay where their acyclic dependencies put them."""
    n = len(deps)
    dependents: list[list[int]] = [[] for _ in range(n)]
    waiting = [0] * n
    for v, ds in enumerate(deps):
        for u in set(ds):
            dependents[u].append(v)
            waiting[v] += 1
    layer = [0] * n
    ready = [v for v in range(n) if waiting[v] == 0]
    while ready:
        u = ready.pop()
        for v in dependents[u]:
            layer[v] = max(layer[v], layer[u] + 1)
            waiting[v] -= 1
            if waiting[v] == 0:
                ready.append(v)
    return layer


class _Grid:
    """Vertices (steps, then dummies) with layers, neighbours and positions."""

    def __init__(self, n: int, layer: list[int]) -> None:
        self.n = n
        self.layer = list(layer)
        self.up: list[list[int]] = [[] for _ in range(n)]  # neighbours one layer left
        self.down: list[list[int]] = [[] for _ in range(n)]  # neighbours one layer right
        self.chains: list[list[int]] = []  # per routed edge: its vertices left to right

    def dummy(self, layer: int) -> int:
        self.layer.append(layer)
        self.up.append([])
        self.down.append([])
        return len(self.layer) - 1

    def link(self, u: int, v: int) -> None:
        self.down[u].append(v)
        self.up[v].append(u)

    def is_dummy(self, v: int) -> bool:
        return v >= self.n


def _build_grid(edges: list[tuple[int, int]], layer: list[int]) -> tuple[_Grid, list[int]]:
    """The grid with dummies for long edges (shortest first, within the budget); the
    indexes of edges drawn direct (over budget, or not pointing right)."""
    grid = _Grid(len(layer), layer)
    direct = []
    budget = DUMMY_BUDGET
    by_span = sorted(range(len(edges)), key=lambda k: layer[edges[k][1]] - layer[edges[k][0]])
    chain_of: dict[int, list[int]] = {}
    for k in by_span:
        u, v = edges[k]
        span = layer[v] - layer[u]
        if span < 1 or span - 1 > budget:
            direct.append(k)
            continue
        budget -= span - 1
        chain = [u] + [grid.dummy(layer[u] + i) for i in range(1, span)] + [v]
        for a, b in pairwise(chain):
            grid.link(a, b)
        chain_of[k] = chain
    grid.chains = [chain_of[k] for k in range(len(edges)) if k in chain_of]
    return grid, sorted(direct)


def _crossings(layers: list[list[int]], pos: list[int], down: list[list[int]]) -> int:
    """Edge crossings between every pair of adjacent layers: inversions, by a Fenwick tree."""
    total = 0
    for i in range(len(layers) - 1):
        pairs = sorted((pos[u], pos[w]) for u in layers[i] for w in down[u])
        size = len(layers[i + 1]) + 1
        tree = [0] * (size + 1)
        seen = 0
        for _, pw in pairs:
            # count earlier pairs whose lower end lies right of pw
            j, below = pw + 1, 0
            while j > 0:
                below += tree[j]
                j -= j & -j
            total += seen - below
            j = pw + 1
            while j <= size:
                tree[j] += 1
                j += j & -j
            seen += 1
    return total


def _order(grid: _Grid) -> list[list[int]]:
    """Layers as ordered vertex lists, with few crossings (barycenter sweeps)."""
    count = max(grid.layer, default=-1) + 1
    layers: list[list[int]] = [[] for _ in range(count)]
    for v, i in enumerate(grid.layer):
        layers[i].append(v)
    pos = [0] * len(grid.layer)

    def number(layer: list[int]) -> None:
        for k, v in enumerate(layer):
            pos[v] = k

    for layer in layers:
        number(layer)
    best = [list(layer) for layer in layers]
    fewest = _crossings(layers, pos, grid.down)
    stale = 0
    for sweep in range(SWEEPS):
        if fewest == 0 or stale >= 6:
            break
        rightward = sweep % 2 == 0
        indexes = range(1, count) if rightward else range(count - 2, -1, -1)
        near = grid.up if rightward else grid.down
        for i in indexes:
            def centre(v: int, near: list[list[int]] = near) -> float:
                ns = near[v]
                return sum(pos[u] for u in ns) / len(ns) if ns else float(pos[v])

            layers[i].sort(key=centre)
            number(layers[i])
        now = _crossings(layers, pos, grid.down)
        if now < fewest:
            fewest, best, stale = now, [list(layer) for layer in layers], 0
        else:
            stale += 1
    return best


def _isotonic(values: list[float], weights: list[float]) -> list[float]:
    """Least-squares nondecreasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for value, weight in zip(values, weights, strict=True):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    fitted: list[float] = []
    for mean, _, count in blocks:
        fitted.extend([mean] * int(count))
    return fitted


def _centres(grid: _Grid, layers: list[list[int]]) -> list[float]:
    """Vertical centre of every vertex: near its neighbours, order and gaps kept."""
    height = [0.0 if grid.is_dummy(v) else BOX_H for v in range(len(grid.layer))]

    def gap(a: int, b: int) -> float:
        both_real = not (grid.is_dummy(a) or grid.is_dummy(b))
        return (height[a] + height[b]) / 2 + (GAP_Y if both_real else GAP_DUMMY)

    offsets = []
    for layer in layers:
        off = [0.0]
        for a, b in pairwise(layer):
            off.append(off[-1] + gap(a, b))
        offsets.append(off)
    centre = [0.0] * len(grid.layer)
    for layer, off in zip(layers, offsets, strict=True):
        for v, o in zip(layer, off, strict=True):
            centre[v] = o

    def place(i: int, near: list[list[int]]) -> None:
        layer, off = layers[i], offsets[i]
        want = [sum(centre[u] for u in near[v]) / len(near[v]) if near[v] else centre[v]
                for v in layer]
        weights = [4.0 if grid.is_dummy(v) else 1.0 if near[v] else 0.1 for v in layer]
        fitted = _isotonic([w - o for w, o in zip(want, off, strict=True)], weights)
        for v, z, o in zip(layer, fitted, off, strict=True):
            centre[v] = z + o

    count = len(layers)
    for _ in range(4):
        for i in range(1, count):
            place(i, grid.up)
        for i in range(count - 2, -1, -1):
            place(i, grid.down)
    for i in range(1, count):
        place(i, grid.up)
    return centre


def layout(graph: Graph) -> Layout:
    """Boxes and edge routes for `graph`, origin at the top left, no margins."""
    ids = [node.id for node in graph.nodes]
    index = {sid: i for i, sid in enumerate(ids)}
    deps = [[index[d] for d in node.deps if d in index] for node in graph.nodes]
    edges = [(u, v) for v, ds in enumerate(deps) for u in dict.fromkeys(ds)]
    grid, direct = _build_grid(edges, longest_path_layers(deps))
    layers = _order(grid)
    centre = _centres(grid, layers)
    widths = [box_width(sid) for sid in ids]
    col_w = [max([widths[v] for v in layer if not grid.is_dummy(v)], default=24.0)
             for layer in layers]
    col_x = []
    x = 0.0
    for w in col_w:
        col_x.append(x)
        x += w + GAP_X
    top = min((centre[v] - (0 if grid.is_dummy(v) else BOX_H / 2))
              for layer in layers for v in layer) if ids else 0.0

    def y(v: int) -> float:
        return round(centre[v] - top, 1)

    boxes = {}
    for i, layer in enumerate(layers):
        for v in layer:
            if not grid.is_dummy(v):
                w = widths[v]
                boxes[ids[v]] = Box(ids[v], i, round(col_x[i] + (col_w[i] - w) / 2, 1),
                                    round(y(v) - BOX_H / 2, 1), w, BOX_H)

    routes = []
    for chain in grid.chains:
        first, last = boxes[ids[chain[0]]], boxes[ids[chain[-1]]]
        points = [(first.x + first.w, y(chain[0]))]
        for a, b in pairwise(chain):
            i, j = grid.layer[a], grid.layer[b]
            points.append((round(col_x[i] + col_w[i], 1), y(a)))
            points.append((round(col_x[j], 1), y(b)))
        points.append((last.x, y(chain[-1])))
        routes.append(Route(ids[chain[0]], ids[chain[-1]], points))
    for k in direct:
        u, v = edges[k]
        a, b = boxes[ids[u]], boxes[ids[v]]
        routes.append(Route(ids[u], ids[v], [(a.x + a.w, a.y + BOX_H / 2),
                                             (a.x + a.w, a.y + BOX_H / 2),
                                             (b.x, b.y + BOX_H / 2), (b.x, b.y + BOX_H / 2)]))
    width = (col_x[-1] + col_w[-1]) if layers else 0.0
    height = max((b.y + b.h for b in boxes.values()), default=0.0)
    for route in routes:
        height = max(height, *(py for _, py in route.points))
    return Layout(boxes, routes, round(width, 1), round(height, 1),
                  [[ids[v] for v in layer if not grid.is_dummy(v)] for layer in layers])


# ---- Mermaid and DOT ------------------------------------------------------------------


def _states_shown(graph: Graph, legend: Iterable[str] | None) -> list[str]:
    if graph.state is None:
        return []
    if legend is not None:
        return list(legend)
    present = {node.state for node in graph.nodes}
    return [s for s in STATES if s in present]


def mermaid(graph: Graph) -> str:
    """A Mermaid flowchart; steps are `s0`, `s1`, ... labelled with their ids (ids may hold
    `.` and `-`, which Mermaid reads as syntax); a run's steps coloured, with a legend."""
    lines = ["flowchart LR", f"    %% {graph.title}"]
    key = {node.id: f"s{i}" for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        lines.append(f'    {key[node.id]}["{node.id}"]')
    for dep, sid in graph.edges():
        lines.append(f"    {key[dep]} --> {key[sid]}")
    shown = _states_shown(graph, None)
    for state in shown:
        fill, stroke = COLOURS[state]
        lines.append(f"    classDef {state} fill:{fill},stroke:{stroke},color:#000")
    for state in shown:
        members = [key[n.id] for n in graph.nodes if n.state == state]
        lines.append(f"    class {','.join(members)} {state}")
    if shown:
        lines.append('    subgraph legend["legend"]')
        lines.append("        direction LR")
        for state in shown:
            lines.append(f'        legend_{state}["{state}"]:::{state}')
        lines.append("    end")
    return "\n".join(lines) + "\n"


def _dot_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def dot(graph: Graph) -> str:
    """A Graphviz digraph (left to right); a run's steps filled by state, with a legend
    cluster whose nodes are named `legend:STATE`."""
    lines = [
        f"digraph {_dot_str(graph.title)} {{",
        "    rankdir=LR;",
        f"    label={_dot_str(graph.title)}; labelloc=t;",
        '    node [shape=box, style="rounded,filled", fontname="monospace", '
        f'fillcolor="{NO_STATE[0]}", color="{NO_STATE[1]}"];',
    ]
    for node in graph.nodes:
        attrs = []
        if node.state is not None:
            fill, stroke = COLOURS.get(node.state, NO_STATE)
            attrs += [f'fillcolor="{fill}"', f'color="{stroke}"']
        if node.tip:
            attrs.append(f"tooltip={_dot_str(node.tip)}")
        lines.append(f"    {_dot_str(node.id)}" + (f" [{', '.join(attrs)}]" if attrs else "") + ";")
    for dep, sid in graph.edges():
        lines.append(f"    {_dot_str(dep)} -> {_dot_str(sid)};")
    shown = _states_shown(graph, None)
    if shown:
        lines.append('    subgraph cluster_legend {')
        lines.append('        label="legend";')
        for state in shown:
            fill, stroke = COLOURS[state]
            lines.append(f'        "legend:{state}" [label="{state}", fillcolor="{fill}", '
                         f'color="{stroke}"];')
        lines.append("    }")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---- SVG -------------------------------------------------------------------------------


def _path(points: list[tuple[float, float]]) -> str:
    """Straight runs between (0,1), (2,3), ...; curves between (1,2), (3,4), ..."""
    (x0, y0), rest = points[0], points[1:]
    parts = [f"M{x0:g},{y0:g}"]
    for k, (x, y) in enumerate(rest):
        if k % 2 == 0:
            parts.append(f"L{x:g},{y:g}")
        else:
            px, py = rest[k - 1]
            mid = round((px + x) / 2, 1)
            parts.append(f"C{mid:g},{py:g} {mid:g},{y:g} {x:g},{y:g}")
    return " ".join(parts)


def style() -> str:
    """The CSS of every picture (and of the web page's DAG): colours by state class."""
    rules = [
        f"text{{font:{FONT_PX}px ui-monospace,'DejaVu Sans Mono',monospace;fill:#111}}",
        ".n rect{stroke-width:1.5}",
        ".e{fill:none;stroke:#78909c;stroke-width:1.2}",
        ".title{font-weight:bold}",
        ".s-SKIPPED rect{stroke-dasharray:4 3}",
    ]
    for state, (fill, stroke) in COLOURS.items():
        rules.append(f".s-{state} rect{{fill:{fill};stroke:{stroke}}}")
    return "\n".join(rules)


def _legend(states: list[str], y: float) -> tuple[list[str], float]:
    """Swatches in a row at `y`; the parts and the row's width."""
    parts = ['<g class="legend">']
    x = 0.0
    for state in states:
        fill, stroke = COLOURS[state]
        parts.append(f'<g class="n s-{state}"><rect x="{x:g}" y="{y:g}" width="14" '
                     f'height="14" rx="3" fill="{fill}" stroke="{stroke}"/>'
                     f'<text x="{x + 19:g}" y="{y + 11:g}">{state}</text></g>')
        x += 19 + len(state) * CHAR_W + 16
    parts.append("</g>")
    return parts, x


def svg(graph: Graph, legend: Sequence[str] | None = None, lay: Layout | None = None) -> str:
    """A standalone SVG (no script, no external reference). A run's steps carry the class
    `n s-STATE` and `data-step`, so that a page can recolour them by changing the class;
    the colours are also presentation attributes, for viewers without CSS.
    `legend`: the states to list (default: those present)."""
    lay = lay or layout(graph)
    states = _states_shown(graph, legend)
    title_y = MARGIN + FONT_PX
    parts: list[str] = []
    top = title_y + 10
    legend_w = 0.0
    if states:
        legend_parts, legend_w = _legend(states, 0)
        parts.append(f'<g transform="translate({MARGIN:g},{top:g})">')
        parts += legend_parts
        parts.append("</g>")
        top += 14 + 14
    title_w = len(graph.title) * CHAR_W
    width = round(max(lay.width, legend_w, title_w) + 2 * MARGIN, 1)
    height = round(top + lay.height + MARGIN, 1)
    parts.append(f'<g transform="translate({MARGIN:g},{top:g})">')
    parts.append('<g class="edges">')
    for route in lay.routes:
        parts.append(f'<path class="e" data-from={quoteattr(route.src)} '
                     f'data-to={quoteattr(route.dst)} d="{_path(route.points)}" '
                     'marker-end="url(#arrow)"/>')
    parts.append("</g>")
    parts.append('<g class="nodes">')
    by_id = {node.id: node for node in graph.nodes}
    for sid, box in lay.boxes.items():
        node = by_id[sid]
        fill, stroke = COLOURS.get(node.state or "", NO_STATE)
        cls = f"n s-{node.state}" if node.state else "n"
        tip = node.tip or sid
        parts.append(
            f'<g class="{cls}" data-step={quoteattr(sid)}><title>{escape(tip)}</title>'
            f'<rect x="{box.x:g}" y="{box.y:g}" width="{box.w:g}" height="{box.h:g}" rx="5" '
            f'fill="{fill}" stroke="{stroke}"/>'
            f'<text x="{box.x + PAD_X:g}" y="{box.y + box.h / 2 + 4:g}">'
            f"{escape(label(sid))}</text></g>"
        )
    parts.append("</g></g>")
    head = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="dag" width="{width:g}" '
        f'height="{height:g}" viewBox="0 0 {width:g} {height:g}">',
        f"<title>{escape(graph.title)}</title>",
        f"<style>{style()}</style>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#78909c"/></marker></defs>',
        '<rect width="100%" height="100%" fill="#ffffff"/>',
        f'<text class="title" x="{MARGIN:g}" y="{title_y:g}">{escape(graph.title)}</text>',
    ]
    return "\n".join(head + parts + ["</svg>"]) + "\n"


def render(graph: Graph, fmt: str) -> str:
    """`graph` in format `fmt` (one of FORMATS)."""
    if fmt == "mermaid":
        return mermaid(graph)
    if fmt == "dot":
        return dot(graph)
    return svg(graph)
