"""`wfctl graph`: the layered layout (no overlaps, edges point right, routes clear of boxes,
200 steps), Mermaid and DOT parsed back, SVG well-formed, and the command end to end."""

from __future__ import annotations

import json
import random
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from itertools import combinations
from pathlib import Path

import pydot
import pytest
from helpers import Daemon, run_json, write_workflow
from hypothesis import given, settings
from hypothesis import strategies as hs

from wfctl import graph as g
from wfd.workflow import parse_workflow

SVG_NS = "{http://www.w3.org/2000/svg}"
# pydot's grammar uses pyparsing names that pyparsing now calls deprecated
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DEMO = {"name": "demo-etl", "steps": [
    {"id": "prepare", "command": "true"},
    {"id": "fetch-sales", "command": "true", "depends_on": ["prepare"]},
    {"id": "fetch-stock", "command": "true", "depends_on": ["prepare"]},
    {"id": "transform", "command": "true", "depends_on": ["fetch-sales", "fetch-stock"]},
    {"id": "upload", "command": "exit 3", "depends_on": ["transform"]},
    {"id": "report", "command": "true", "depends_on": ["upload", "prepare"]},
]}


def random_workflow(n: int, seed: int, layers: int = 8, long_edges: float = 0.2) -> dict:
    """`n` steps in `layers` bands, each depending on 1-3 steps of the band before and
    sometimes on one further back (edges spanning several layers)."""
    rnd = random.Random(seed)
    per = max(1, n // layers)
    steps = []
    for i in range(n):
        band = i // per
        deps: set[int] = set()
        if band:
            lo, hi = (band - 1) * per, min(band * per, i)
            deps = {rnd.randrange(lo, hi) for _ in range(rnd.randint(1, 3))}
            if band > 1 and rnd.random() < long_edges:
                deps.add(rnd.randrange(0, lo))
        steps.append({"id": f"step-{i:03d}", "command": "true",
                      "depends_on": [f"step-{d:03d}" for d in sorted(deps)]})
    return {"name": f"random-{n}", "steps": steps}


def graph_of(doc: dict) -> g.Graph:
    return g.from_workflow(parse_workflow(json.dumps(doc), "wf"))


def overlap(a: g.Box, b: g.Box) -> bool:
    return a.x < b.x + b.w and b.x < a.x + a.w and a.y < b.y + b.h and b.y < a.y + a.h


def check_layout(graph: g.Graph) -> g.Layout:
    """Every property a readable layered drawing needs, asserted."""
    lay = g.layout(graph)
    boxes = lay.boxes
    assert set(boxes) == {node.id for node in graph.nodes}
    for a, b in combinations(boxes.values(), 2):
        assert not overlap(a, b), f"{a} overlaps {b}"
    for dep, sid in graph.edges():
        assert boxes[dep].layer < boxes[sid].layer, f"{dep} -> {sid} does not point right"
        assert boxes[dep].x + boxes[dep].w < boxes[sid].x
    for box in boxes.values():
        assert 0 <= box.x and box.x + box.w <= lay.width + 0.1
        assert 0 <= box.y and box.y + box.h <= lay.height + 0.1
    assert sorted((r.src, r.dst) for r in lay.routes) == sorted(graph.edges())
    for route in lay.routes:
        src, dst = boxes[route.src], boxes[route.dst]
        assert route.points[0] == pytest.approx((src.x + src.w, src.y + src.h / 2), abs=0.06)
        assert route.points[-1] == pytest.approx((dst.x, dst.y + dst.h / 2), abs=0.06)
        # the straight runs (inside columns) never cross a box but their own ends'
        for (x1, y1), (x2, y2) in zip(route.points[::2], route.points[1::2], strict=True):
            assert y1 == y2
            for box in boxes.values():
                if box.id in (route.src, route.dst):
                    continue
                crosses = box.y < y1 < box.y + box.h and x1 < box.x + box.w and box.x < x2
                assert not crosses, f"edge {route.src}->{route.dst} runs through {box.id}"
        # the curves (horizontal tangents: each stays in its ends' bounding box) meet no box
        for (x1, y1), (x2, y2) in zip(route.points[1::2], route.points[2::2], strict=False):
            low, high = min(y1, y2), max(y1, y2)
            for box in boxes.values():
                meets = (x1 + 0.5 < box.x + box.w and box.x < x2 - 0.5  # touching: fine
                         and low <= box.y + box.h and box.y <= high)
                assert not meets, f"edge {route.src}->{route.dst} curves over {box.id}"
    return lay


def test_layers_are_longest_paths() -> None:
    # 0 -> 1 -> 2, 0 -> 2, 3 alone
    assert g.longest_path_layers([[], [0], [1, 0], []]) == [0, 1, 2, 0]


def test_demo_layout() -> None:
    lay = check_layout(graph_of(DEMO))
    assert lay.layers == [["prepare"], ["fetch-sales", "fetch-stock"], ["transform"],
                          ["upload"], ["report"]]


def test_a_chain_lies_on_one_line() -> None:
    steps = [{"id": "s0", "command": "true"}] + [
        {"id": f"s{i}", "command": "true", "depends_on": [f"s{i - 1}"]} for i in range(1, 30)]
    lay = check_layout(graph_of({"steps": steps}))
    assert len({box.y for box in lay.boxes.values()}) == 1


def test_crossings_are_removed_where_possible() -> None:
    # a1 feeds b2, a2 feeds b1: in file order the two edges cross; reordered they do not
    doc = {"steps": [
        {"id": "a1", "command": "true"}, {"id": "a2", "command": "true"},
        {"id": "b1", "command": "true", "depends_on": ["a2"]},
        {"id": "b2", "command": "true", "depends_on": ["a1"]},
    ]}
    lay = check_layout(graph_of(doc))
    b = lay.boxes
    assert (b["a1"].y < b["a2"].y) == (b["b2"].y < b["b1"].y)


def test_two_hundred_steps_lay_out_fast_and_clean() -> None:
    graph = graph_of(random_workflow(200, seed=7))
    started = time.perf_counter()
    lay = check_layout(graph)
    assert time.perf_counter() - started < 5  # far less in practice; a lax bound for CI
    # readable: boxes keep their full size (no shrinking to fit), labels whole
    assert all(box.h == g.BOX_H for box in lay.boxes.values())
    svg = g.svg(graph, lay=lay)
    assert svg.count("data-step=") == 200


@settings(max_examples=60, deadline=None)
@given(hs.integers(1, 40), hs.integers(0, 10_000), hs.integers(1, 6), hs.floats(0, 1))
def test_any_dag_lays_out_clean(n: int, seed: int, layers: int, long_edges: float) -> None:
    check_layout(graph_of(random_workflow(n, seed, layers, long_edges)))


def test_long_ids_are_cut_in_the_box_and_whole_in_the_tooltip() -> None:
    long_id = "x" * 100
    svg = g.svg(graph_of({"steps": [{"id": long_id, "command": "true"}]}))
    root = ET.fromstring(svg)
    node = root.find(f".//{SVG_NS}g[@data-step='{long_id}']")
    assert node is not None
    assert node.find(f"{SVG_NS}title").text == long_id
    assert node.find(f"{SVG_NS}text").text == "x" * 39 + "…"


# ---- Mermaid and DOT, parsed back ----------------------------------------------------------


MERMAID_NODE = re.compile(r'^    (s\d+)\["([^"]+)"\]$')
MERMAID_EDGE = re.compile(r"^    (s\d+) --> (s\d+)$")
MERMAID_CLASS = re.compile(r"^    class ((?:s\d+,)*s\d+) ([A-Z_]+)$")
MERMAID_OTHER = re.compile(r"^(flowchart LR|    %% .*|    classDef [A-Z_]+ fill:#[0-9a-f]{6},"
                           r"stroke:#[0-9a-f]{6},color:#000|    subgraph legend\[\"legend\"\]|"
                           r"        direction LR|"
                           r"        legend_(?P<s>[A-Z_]+)\[\"(?P=s)\"\]:::(?P=s)|    end)$")


def parse_mermaid(text: str) -> tuple[dict[str, str], list[tuple[str, str]], dict[str, str]]:
    """Nodes (key -> label), edges (labels) and classes (label -> class) of our flowcharts;
    a line of any other shape fails the test."""
    nodes: dict[str, str] = {}
    edges, classes = [], {}
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    for line in lines:
        if m := MERMAID_NODE.match(line):
            nodes[m[1]] = m[2]
        elif m := MERMAID_EDGE.match(line):
            edges.append((nodes[m[1]], nodes[m[2]]))
        elif m := MERMAID_CLASS.match(line):
            classes.update({nodes[key]: m[2] for key in m[1].split(",")})
        else:
            assert MERMAID_OTHER.match(line), f"unexpected Mermaid line {line!r}"
    return nodes, edges, classes


def status_of(doc: dict, states: dict[str, str]) -> object:
    from wfd.state import RunStatus, StepStatus

    steps = {s["id"]: StepStatus(states[s["id"]], 1, 0, None, None, None,
                                 list(s.get("depends_on", []))) for s in doc["steps"]}
    return RunStatus("20261125T095852Z-7f3a9c01", doc["name"], "alice", "FAILED", None,
                     None, None, steps)


DEMO_STATES = {"prepare": "SUCCEEDED", "fetch-sales": "SUCCEEDED", "fetch-stock": "SUCCEEDED",
               "transform": "SUCCEEDED", "upload": "FAILED", "report": "SKIPPED"}


def demo_edges() -> list[tuple[str, str]]:
    return [(d, s["id"]) for s in DEMO["steps"] for d in s.get("depends_on", [])]


def test_mermaid_of_a_file_parses_back() -> None:
    nodes, edges, classes = parse_mermaid(g.mermaid(graph_of(DEMO)))
    assert list(nodes.values()) == [s["id"] for s in DEMO["steps"]]
    assert sorted(edges) == sorted(demo_edges())
    assert classes == {}


def test_mermaid_of_a_run_has_states_and_a_legend() -> None:
    text = g.mermaid(g.from_status(status_of(DEMO, DEMO_STATES)))
    nodes, edges, classes = parse_mermaid(text)
    assert sorted(edges) == sorted(demo_edges())
    assert classes == DEMO_STATES
    legend = re.findall(r"legend_([A-Z_]+)\[", text)
    assert legend == ["SUCCEEDED", "FAILED", "SKIPPED"]  # the states present, in order
    for state in legend:
        assert f"classDef {state} fill:{g.COLOURS[state][0]}" in text


def parse_dot(text: str) -> tuple[dict[str, dict], list[tuple[str, str]]]:
    """Nodes (name -> attributes) and edges of a DOT text, by pydot; legend nodes apart."""
    (parsed,) = pydot.graph_from_dot_data(text)
    strip = lambda name: name.strip('"')  # noqa: E731
    nodes = {strip(n.get_name()): n.get_attributes() for n in parsed.get_nodes()
             if strip(n.get_name()) not in ("node", "edge", "graph")}
    for sub in parsed.get_subgraphs():
        assert sub.get_name() == "cluster_legend"
        for n in sub.get_nodes():
            nodes[strip(n.get_name())] = n.get_attributes()
    edges = [(strip(e.get_source()), strip(e.get_destination())) for e in parsed.get_edges()]
    return nodes, edges


def test_dot_of_a_file_parses_back() -> None:
    nodes, edges = parse_dot(g.dot(graph_of(DEMO)))
    assert list(nodes) == [s["id"] for s in DEMO["steps"]]
    assert sorted(edges) == sorted(demo_edges())


def test_dot_of_a_run_is_filled_by_state_with_a_legend() -> None:
    nodes, edges = parse_dot(g.dot(g.from_status(status_of(DEMO, DEMO_STATES))))
    assert sorted(edges) == sorted(demo_edges())
    for sid, state in DEMO_STATES.items():
        assert nodes[sid]["fillcolor"].strip('"') == g.COLOURS[state][0]
    legend = {name for name in nodes if name.startswith("legend:")}
    assert legend == {"legend:SUCCEEDED", "legend:FAILED", "legend:SKIPPED"}


def test_dot_quotes_what_must_be_quoted() -> None:
    doc = {"name": 'say "hi" \\ there', "steps": [{"id": "a.b-c_d", "command": "true"}]}
    (parsed,) = pydot.graph_from_dot_data(g.dot(graph_of(doc)))
    assert parsed.get_name().strip('"') == 'say \\"hi\\" \\\\ there'
    assert [n.get_name().strip('"') for n in parsed.get_nodes()
            if n.get_name() not in ("node", "edge", "graph")] == ["a.b-c_d"]


def test_svg_is_standalone_and_coloured_by_state() -> None:
    svg = g.svg(g.from_status(status_of(DEMO, DEMO_STATES)))
    root = ET.fromstring(svg)  # well-formed
    assert "href" not in svg and "<script" not in svg  # nothing to fetch, nothing to run
    for sid, state in DEMO_STATES.items():
        node = root.find(f".//{SVG_NS}g[@data-step='{sid}']")
        assert node.get("class") == f"n s-{state}"
        assert node.find(f"{SVG_NS}rect").get("fill") == g.COLOURS[state][0]
    legend = root.find(f".//{SVG_NS}g[@class='legend']")
    assert [t.text for t in legend.iter(f"{SVG_NS}text")] == ["SUCCEEDED", "FAILED", "SKIPPED"]


# ---- the command -----------------------------------------------------------------------------


def test_graph_of_a_file_through_wfctl(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon(start=False)  # no daemon: a file needs none
    wf = write_workflow(wfd_tmp, DEMO)
    dot = d.wfctl("graph", str(wf), "--format", "dot")
    assert dot.returncode == 0, dot.stderr
    assert sorted(parse_dot(dot.stdout)[1]) == sorted(demo_edges())
    mermaid = d.wfctl("graph", str(wf), "--format", "mermaid")
    assert sorted(parse_mermaid(mermaid.stdout)[1]) == sorted(demo_edges())
    svg = d.wfctl("graph", str(wf))
    assert svg.returncode == 0 and svg.stderr == ""
    assert len(ET.fromstring(svg.stdout).findall(f".//{SVG_NS}g[@data-step]")) == 6


def test_graph_of_a_bad_file_or_format(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon(start=False)
    bad = write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "true",
                                              "depends_on": ["nope"]}]}, "bad.json")
    done = d.wfctl("graph", str(bad))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f'{bad}: $.steps[0].depends_on[0]: unknown step "nope"\n'
    done = d.wfctl("graph", str(wfd_tmp / "missing.json"))
    assert done.returncode == 2 and "cannot read" in done.stderr
    done = d.wfctl("graph", str(bad), "--format", "png")
    assert done.returncode == 2 and "invalid choice: 'png'" in done.stderr
    assert "Traceback" not in done.stderr


def test_graph_of_a_run_and_depends_on_in_status(daemon: Callable[..., Daemon],
                                                 wfd_tmp: Path) -> None:
    d = daemon()
    done = d.wfctl("run", str(write_workflow(wfd_tmp, DEMO)), "--wait")
    assert done.returncode == 1, done.stderr  # upload FAILED, report SKIPPED
    run_id = done.stdout.strip()
    status = run_json(d, run_id)
    assert {sid: step["depends_on"] for sid, step in status["steps"].items()} == {
        s["id"]: s.get("depends_on", []) for s in DEMO["steps"]}
    done = d.wfctl("graph", run_id, "--format", "mermaid")
    assert done.returncode == 0, done.stderr
    _, edges, classes = parse_mermaid(done.stdout)
    assert sorted(edges) == sorted(demo_edges())
    assert classes == DEMO_STATES
    done = d.wfctl("graph", run_id, "--format", "svg")
    root = ET.fromstring(done.stdout)
    assert root.find(f".//{SVG_NS}g[@data-step='upload']").get("class") == "n s-FAILED"
    done = d.wfctl("graph", "20261125T095852Z-00000000")
    assert done.returncode == 2
    assert done.stderr == "wfctl: no such run: 20261125T095852Z-00000000\n"


@pytest.mark.parametrize("fmt", g.FORMATS)
def test_every_format_renders_200_steps(fmt: str) -> None:
    text = g.render(graph_of(random_workflow(200, seed=3)), fmt)
    assert text.count("step-199") >= 1
