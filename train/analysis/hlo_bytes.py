"""Bytes moved by a compiled XLA program, read from its HLO text: by its collectives
(`collective_bytes`) and, for TPU programs, to and from HBM (`hbm_bytes`).

    compiled = jax.jit(step).lower(*args).compile()
    collective_bytes(compiled.as_text())["total"]["wire_bytes"]

For every collective instruction (all-reduce, all-gather, reduce-scatter, all-to-all,
collective-permute, and their asynchronous `-start` forms; `-done` halves and `async-start`
wrappers are not counted again) it sums the operand bytes and the bytes each device sends
under the usual ring-algorithm convention, with N the replica-group size:

    all-reduce          2 (N-1)/N * size
    all-gather          (N-1)/N * output size  (= (N-1) * operand size)
    reduce-scatter      (N-1)/N * input size
    all-to-all          (N-1)/N * size
    collective-permute  size

Instructions inside `while` loops with a known trip count (e.g. `lax.scan` over layers)
count once per trip, so the result is per execution of the program; conditional branches
count as if taken, and loops of unknown trip count as one trip.
"""

from __future__ import annotations

import math
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
          "s2": 0.25, "u2": 0.25}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([<=0-9,]*)\]")
_ARRAY_LAYOUT = re.compile(r"\b([a-z][a-z0-9]*)\[([<=0-9,]*)\](\{[^}]*\})?")
_ON_CHIP = re.compile(r"S\([1-9]\d*\)")  # layout memory space other than HBM (VMEM, ...)
_TILE = re.compile(r"T\(([0-9,]+)\)")  # the first (outer) tile of a TPU layout
_MOVES_NOTHING = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "after-all",
                  "add-dependency", "opt-barrier", "partition-id", "replica-id"}
_ASSIGN = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OPCODE = re.compile(r"\s*([a-z][\w\-]*)\(")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{\s*$")
_CALLEE = re.compile(r"\b(body|condition|to_apply|calls|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_PARTITIONS = re.compile(r"\bnum_partitions=(\d+)")
_REPLICAS = re.compile(r"\breplica_count=(\d+)")


def _padded(sizes: list[int], layout: str) -> list[int]:
    """`sizes` rounded up to the layout's first tile, e.g. `{1,0:T(8,128)}` pads the minor
    dimension (1 in minor-to-major order) to 128 and the next to 8: an f32[n,1] column
    takes 512 bytes per entry in HBM."""
    order_text, _, tiling = layout.strip("{}").partition(":")
    tile = _TILE.search(tiling)
    order = [int(d) for d in order_text.split(",") if d.strip()]
    if tile is None or not order:
        return sizes
    sizes = list(sizes)
    for dim, t in zip(order, reversed([int(t) for t in tile.group(1).split(",")])):
        sizes[dim] = -(-sizes[dim] // t) * t
    return sizes


def shape_bytes(shape: str, hbm_only: bool = False) -> float:
    """Bytes of an HLO shape string (an array or a tuple of arrays); tokens, opaque: 0.
    `hbm_only`: count only arrays whose layout puts them in HBM (no `S(n)`, n > 0), with
    their tile padding (what they occupy there); otherwise logical sizes."""
    total = 0.0
    for dtype, dims, layout in _ARRAY_LAYOUT.findall(shape):
        if hbm_only and _ON_CHIP.search(layout):
            continue
        if dtype.startswith("f8"):
            size = 1
        elif dtype in _BYTES:
            size = _BYTES[dtype]
        else:
            continue
        sizes = [int(d.replace("<=", "")) for d in dims.split(",") if d]
        if hbm_only and layout:
            sizes = _padded(sizes, layout)
        total += size * math.prod(sizes)
    return total


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at `text[start]` ('(' or '{')."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    return len(text)


def parse_instruction(line: str) -> tuple[str, str, str, str, str] | None:
    """(name, result shape, opcode, operands text, attributes text) of one HLO line."""
    m = _ASSIGN.match(line)
    if not m:
        return None
    pos = m.end()
    if line.startswith("(", pos):
        end = _balanced(line, pos)
    else:
        end = line.find(" ", pos)
        end = len(line) if end < 0 else end
    shape = line[pos:end]
    op = _OPCODE.match(line, end)
    if not op:
        return None
    close = _balanced(line, op.end() - 1)
    return m.group(1), shape, op.group(1), line[op.end():close - 1], line[close:]


def _group_size(attrs: str, default: int) -> int:
    if m := _GROUPS_MESH.search(attrs):  # mesh['a'=8,'b'=1] {'a'}: the product over {...}
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        return math.prod(sizes.get(a, 1) for a in re.findall(r"'([^']+)'", m.group(2)))
    if m := _GROUPS_LIST.search(attrs):
        return max(1, len([d for d in m.group(1).split(",") if d]))
    if m := _GROUPS_IOTA.search(attrs):
        return int(m.group(2))
    return default


def _wire(kind: str, operand: float, n: int) -> float:
    if kind == "all-reduce":
        return 2 * (n - 1) / n * operand
    if kind == "all-gather":
        return (n - 1) * operand
    if kind == "collective-permute":
        return operand
    return (n - 1) / n * operand  # reduce-scatter (input size), all-to-all


def _guess_trips(condition: list[tuple], root: tuple | None) -> int:
    """Trip count of a loop whose condition is `i < K` for a constant K (as `lax.scan` /
    `fori_loop` emit, counting from 0 by 1); 1 when the condition has another form."""
    if root is None or root[2] != "compare" or "direction=LT" not in root[4]:
        return 1
    constants = {name: operands for name, _, opcode, operands, _ in condition if opcode == "constant"}
    for name in re.findall(r"%([\w.\-]+)", root[3]):
        if constants.get(name, "").strip().isdigit():
            return int(constants[name])
    return 1


def _multiplicities(hlo_text: str) -> tuple[list[tuple[str, tuple]], dict[str, int]]:
    """(computation, parsed instruction) pairs of the module, and how many times each
    computation runs per execution of ENTRY (while bodies times their trip count: XLA's
    `known_trip_count` when present, else read off an `i < K` condition)."""
    instructions, edges, loops, roots, entry, current = [], [], [], {}, None, None
    for line in hlo_text.splitlines():
        if m := _COMPUTATION.match(line):
            current = m.group(2)
            entry = current if m.group(1) else entry
            continue
        parsed = parse_instruction(line)
        if parsed is None or current is None:
            continue
        instructions.append((current, parsed))
        if line.lstrip().startswith("ROOT"):
            roots[current] = parsed
        attrs = parsed[4]
        callees = dict(_CALLEE.findall(attrs))  # role -> computation
        if parsed[2] == "while" and "body" in callees:
            known = _TRIP_COUNT.search(attrs)
            loops.append((current, callees.pop("body"), callees.get("condition"),
                          int(known.group(1)) if known else None))
        edges += [(current, callee, 1) for callee in callees.values()]
        for m in _BRANCHES.finditer(attrs):
            edges += [(current, callee, 1) for callee in re.findall(r"%([\w.\-]+)", m.group(1))]
    by_computation: dict[str, list[tuple]] = {}
    for computation, parsed in instructions:
        by_computation.setdefault(computation, []).append(parsed)
    for caller, body, condition, known in loops:
        trips = known if known is not None else _guess_trips(
            by_computation.get(condition, []), roots.get(condition))
        edges.append((caller, body, trips))
    callers: dict[str, list[tuple[str, int]]] = {}
    for caller, callee, k in edges:
        callers.setdefault(callee, []).append((caller, k))
    memo: dict[str, int] = {}

    def times(name: str, seen: frozenset = frozenset()) -> int:
        if name == entry or entry is None:
            return 1
        if name not in memo:
            memo[name] = sum(times(c, seen | {name}) * k for c, k in callers.get(name, ())
                             if c not in seen)
        return memo[name]

    return instructions, {name: times(name) for name in by_computation}


def collective_bytes(hlo_text: str) -> dict[str, dict[str, float]]:
    """Per collective kind (and "total"): `count` (executions), `operand_bytes` and
    per-device `wire_bytes` per execution of the program (see module doc). Kinds that do
    not occur are left out."""
    header = hlo_text[:hlo_text.find("\n")] if "\n" in hlo_text else hlo_text
    default = 1
    for pattern in (_PARTITIONS, _REPLICAS):
        if m := pattern.search(header):
            default = max(default, int(m.group(1)))
    instructions, times = _multiplicities(hlo_text)
    shapes = {name: shape for _, (name, shape, *_) in instructions}
    out: dict[str, dict[str, float]] = {}
    for computation, (_, shape, opcode, operands, attrs) in instructions:
        kind = opcode.removesuffix("-start")
        if kind not in KINDS or not times[computation]:
            continue
        names = re.findall(r"%([\w.\-]+)", operands)
        if names and all(n in shapes for n in names):
            operand = sum(shape_bytes(shapes[n]) for n in names)
        else:  # operands printed with their shapes
            operand = shape_bytes(operands)
        n, k = _group_size(attrs, default), times[computation]
        entry = out.setdefault(kind, {"count": 0, "operand_bytes": 0.0, "wire_bytes": 0.0})
        entry["count"] += k
        entry["operand_bytes"] += k * operand
        entry["wire_bytes"] += k * _wire(kind, operand, n) if n > 1 else 0.0
    out["total"] = {k: sum(e[k] for e in out.values()) for k in ("count", "operand_bytes", "wire_bytes")}
    return out


def hbm_bytes(hlo_text: str) -> float:
    """Estimated HBM bytes read + written by one execution of a TPU-compiled program.

    `cost_analysis()["bytes accessed"]` counts every operand and result access, also of
    buffers the TPU compiler keeps in on-chip VMEM (layouts with `S(1)`) and both ends of
    the async copies that stage tensors between HBM and VMEM, so it overstates HBM
    traffic. Here every ENTRY instruction that does work reads each distinct operand that
    lives in HBM (no `S(n)` in its layout) and writes each result in HBM; bookkeeping ops
    (parameter, constant, bitcast, tuple, get-tuple-element, `*-done`, ...) move nothing.
    A `copy-start` / `slice-start` moves its destination (the result of the matching
    `*-done`): read if the source is in HBM, written if the destination is. Sizes include
    tile padding (an f32[n,1] column in a T(8,128) layout moves 512 bytes per entry). An
    approximation: an operand counts as read whole and
    once per instruction, and the bodies of while / call / conditional are not walked.
    """
    entry = hlo_text[hlo_text.index("\nENTRY "):].split("\n}")[0].splitlines()[1:]
    instructions = [p for p in map(parse_instruction, entry) if p is not None]
    shapes = {name: shape for name, shape, *_ in instructions}
    operands = {name: list(dict.fromkeys(re.findall(r"%([\w.\-]+)", ops)))
                for name, _, _, ops, _ in instructions}
    done = {operands[name][0]: shape for name, shape, opcode, _, _ in instructions
            if opcode.endswith("-done") and operands[name]}
    total = 0.0
    for name, shape, opcode, _, _ in instructions:
        if opcode in _MOVES_NOTHING or opcode.endswith("-done"):
            continue
        reads = [shape_bytes(shapes.get(o, ""), hbm_only=True) for o in operands[name]]
        if opcode in ("copy-start", "slice-start"):
            total += shape_bytes(done[name], hbm_only=True) + (shape_bytes(done[name]) if any(reads) else 0)
        else:
            total += shape_bytes(shape, hbm_only=True) + sum(reads)
    return total
