"""Layer-periodic traces: the trace of a model of many identical blocks, written from traces of two shallow copies.

A decoder's step repeats itself once per block: in forward, in backward (in reverse), in the state, in the
optimizer's per-parameter work. Given the traces of copies with n and n + u blocks (u: the smallest period of the
layer pattern, 1 for identical blocks), `LayerPeriodic` finds where the larger repeats: runs of records
(allocations, frees, ops) whose keys repeat with a period, with one copy more than in the smaller trace. It learns
how each reference (a free's allocation, an op's reads and writes) moves from copy to copy: into the same or a
fixed nearby copy, into the mirrored copy (backward frees what the matching forward block saved), or into a copy
counted from either end; and how a record that occurs once but grows with the blocks changes (a foreach op's
list of tensors, its bytes). `at(blocks)` writes the trace of that many blocks, copy by copy.

Nothing is trusted that was not seen: the model learnt from the two traces must write both back, event for event
and op for op, or it is refused (`NotPeriodic`: the caller traces the whole model and says so). The tests hold the
written trace equal to a real trace of more blocks for every architecture family. Op keys and specs (what
`--gpu local` times) are not carried: a periodic trace serves the catalog's costs.

`at_other_batch` saves one of the four traces a plan needs per setup (two copies at two micro-batches): the larger
copy's trace at the second micro-batch is its trace at the first with each number moved as the same record's moved
in the smaller copy, where every copy of a repeating run moved alike there.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from optprof.device.ops import OpRecord
from optprof.device.trace import AllocationTrace, TraceEvent, extrapolated, extrapolated_ops, frees_in_order

# A position's place in a sequence: ("s", n) the n-th static item, ("r", region, copy, offset) in a repeating run;
# a reference's target may also be ("x", id): a storage from before the recording (not in the events)
Place = tuple[Any, ...]


class NotPeriodic(Exception):
    """The two traces do not repeat as blocks: the reason, for the note that the whole model was traced."""


@dataclass(frozen=True)
class Region:
    start: int  # in the larger sequence
    period: int
    copies: int  # in the larger sequence


def _insertions(small: Sequence[Any], large: Sequence[Any]) -> list[tuple[int, int]]:
    """Where `large` has runs that `small` lacks, as (start in large, length), by difflib's matching blocks. Items
    (key, numbers) whose keys agree in a replaced stretch are records that grow (a foreach op's bytes), not
    insertions; a stretch only `small` has is not periodic."""
    import difflib

    inserted = []
    matcher = difflib.SequenceMatcher(None, small, large, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        if tag == "delete" or j2 - j1 < i2 - i1:
            raise NotPeriodic(f"the smaller trace has items the larger lacks (item {i1})")
        grown = i2 - i1
        if _keys(small, i1, grown) == _keys(large, j1, grown):
            start = j1 + grown  # the replaced items grew; the rest is inserted
        elif _keys(small, i1, grown) == _keys(large, j2 - grown, grown):
            start = j1
        else:
            raise NotPeriodic(f"items differ at item {j1}")
        if j2 - j1 > grown:
            inserted.append((start, j2 - j1 - grown))
    merged: list[tuple[int, int]] = []
    for start, length in inserted:
        joined = _joined(large, merged[-1], (start, length)) if merged else None
        if joined is not None:
            merged[-1] = joined
        else:
            merged.append((start, length))
    return merged


def _joined(large: Sequence[Any], one: tuple[int, int], two: tuple[int, int]) -> tuple[int, int] | None:
    """Two nearby insertions as one run (the matching may cut one period in pieces around an item that repeats):
    a run of their joint length whose removal leaves what removing both leaves, near them; None if there is none."""
    (first, length_one), (second, length_two) = one, two
    period = length_one + length_two
    if second - (first + length_one) >= period:
        return None
    low, high = max(0, first - period), min(len(large), second + length_two + period)
    without = [*large[low:first], *large[first + length_one:second], *large[second + length_two:high]]
    for start in range(low, high - period + 1):
        if [*large[low:start], *large[start + period:high]] == without:
            return start, period
    return None


def _keys(items: Sequence[Any], start: int, count: int) -> list[Any]:
    return [item[0] for item in items[start:start + count]]


class Layout:
    """A sequence as static items and repeating regions; `places(grow)` lists the places with `grow` more copies
    in every region."""

    def __init__(self, small: Sequence[Any], large: Sequence[Any]) -> None:
        regions = []
        for start, period in _insertions(small, large):
            first, end = start, start + period
            while first > 0 and large[first - 1] == large[first - 1 + period]:
                first -= 1
            while end < len(large) and large[end] == large[end - period]:
                end += 1
            regions.append(Region(first, period, (end - first) // period))
        regions.sort(key=lambda r: r.start)
        for before, after in itertools.pairwise(regions):
            if before.start + before.period * before.copies > after.start:
                raise NotPeriodic("repeating runs overlap")
        self.regions, self.length = regions, len(large)
        if len(self.places(-1)) != len(small):
            raise NotPeriodic("the smaller trace is not one copy shorter in every repeating run")

    @classmethod
    def fixed(cls, length: int) -> Layout:
        """A sequence of `length` static items."""
        layout = cls.__new__(cls)
        layout.regions, layout.length = [], length
        return layout

    def counts(self, grow: int) -> list[int]:
        return [region.copies + grow for region in self.regions]

    def places(self, grow: int) -> list[Place]:
        out: list[Place] = []
        position = static = 0
        for index, region in enumerate(self.regions):
            out += [("s", static + n) for n in range(region.start - position)]
            static += region.start - position
            out += [("r", index, copy, offset) for copy in range(max(0, region.copies + grow))
                    for offset in range(region.period)]
            position = region.start + region.period * region.copies
        return out + [("s", static + n) for n in range(self.length - position)]


class _Rule:
    """Where one reference slot points, from copy to copy. Targets in a repeating run give the general rule (the
    candidates every observation allows, most natural first): into a copy a fixed distance away, the mirrored
    copy, or a copy counted from either end. A copy whose rule points past either end of that run points at a
    static item instead (the first block's input, the last block's output): learnt per distance past the end."""

    def __init__(self) -> None:
        self.candidates: list[tuple[Any, ...]] | None = None
        self.statics: list[tuple[int | None, int, tuple[int, ...], Place]] = []  # copy, copies, counts, target
        self._edges: dict[tuple[str, int], Place] | None = None
        self._single: bool | None = None  # whether every static observation has the same target

    def observe(self, copy: int | None, copies: int, target: Place, counts: Sequence[int]) -> None:
        """`copy` of `copies` (None: a static item) points at `target`; `counts`: the copies of the target runs."""
        if target[0] != "r":
            self.statics.append((copy, copies, tuple(counts), target))
            return
        _, region, other, offset = target
        last = counts[region] - 1
        found = []  # most natural first: a block reads its neighbour's output, backward frees its forward's
        if copy is not None:
            found += [("shift", region, other - copy, offset), ("mirror", region, other - (last - copy), offset)]
        found += [("first", region, other, offset), ("last", region, last - other, offset)]
        before = self.candidates
        self.candidates = found if self.candidates is None else [c for c in self.candidates if c in found]
        if not self.candidates:
            raise NotPeriodic(f"a reference follows no rule from copy to copy (copy {copy}: {target}; "
                              f"allowed {before})")

    def _general(self, copy: int | None, counts: Sequence[int], candidate: tuple[Any, ...] | None = None
                 ) -> tuple[int, int]:
        """The general rule's copy for `copy` (or `candidate`'s), and the last copy of its run."""
        assert self.candidates
        kind, region, value, _ = candidate or self.candidates[0]
        last = counts[region] - 1
        if kind == "first":
            return value, last
        if kind == "last":
            return last - value, last
        assert copy is not None
        return (copy + value if kind == "shift" else last - copy + value), last

    @staticmethod
    def _past(other: int, last: int) -> tuple[str, int]:
        return ("before", -other) if other < 0 else ("after", other - last)

    def edges(self) -> dict[tuple[str, int], Place]:
        """Each static target by how far past its run's ends the general rule points (without one: by the
        observing copy's distance from its own run's ends)."""
        if self._edges is None:
            self._edges = {}
            if self.candidates:
                # a rule must also send each copy seen pointing at a static item past its run's ends (with few
                # copies, a rule that stays inside can fit every target in the runs: llama's every second block
                # checkpointed, copies of 6 and 8 layers)
                def stays_inside(candidate: tuple[Any, ...]) -> bool:
                    return any(0 <= other <= last for other, last in (
                        self._general(copy, counts, candidate) for copy, _, counts, _ in self.statics))

                self.candidates = [c for c in self.candidates if not stays_inside(c)]
                if not self.candidates:
                    raise NotPeriodic("a reference leaves its run where every rule stays inside it")
            for copy, copies, counts, target in self.statics:
                if self.candidates:
                    keys = [self._past(*self._general(copy, counts))]
                elif copy is not None:
                    keys = [("start", copy), ("end", copies - 1 - copy)]
                else:
                    keys = [("fixed", 0)]
                for key in keys:
                    if self._edges.setdefault(key, target) != target:
                        self._edges[key] = ("conflict",)
        return self._edges

    def _one_target(self) -> bool:
        if self._single is None:
            self._single = len({target for *_, target in self.statics}) == 1
        return self._single

    def target(self, copy: int | None, counts: Sequence[int], copies: int) -> Place:
        edges = self.edges()
        if self.candidates:
            other, last = self._general(copy, counts)
            if 0 <= other <= last:
                return ("r", self.candidates[0][1], other, self.candidates[0][3])
            keys = [self._past(other, last)]
        elif self._one_target():
            return self.statics[0][3]  # every copy reads the same item (rotary tables, the loss's scale)
        elif copy is None:
            keys = [("fixed", 0)]
        else:
            keys = [("start", copy), ("end", copies - 1 - copy)]
        for key in keys:
            if edges.get(key, ("conflict",)) != ("conflict",):
                return edges[key]
        raise NotPeriodic(f"a reference of copy {copy} of {copies} has no target")


@dataclass(frozen=True)
class _Item:
    """An event or op as the model sees it: `key` equal between copies, `numbers` that may grow in a record that
    occurs once, `refs` its lists of referenced allocation ids."""

    key: tuple[Any, ...]
    numbers: tuple[int, ...]
    refs: tuple[tuple[Any, ...], ...]  # allocation ids as traced; target places as written


class _Learnt:
    """One sequence (events or ops) of the two traces: its layout, each static item at both sizes, each region's
    items from its first copy, and a rule per reference slot."""

    def __init__(self, small: list[_Item], large: list[_Item],
                 targets: tuple[dict[int, Place], dict[int, Place]] | None = None,
                 counts: tuple[list[int], list[int]] | None = None) -> None:
        """`targets`: each allocation's place at both sizes, with the regions' `counts` (None: the items are the
        events themselves, and an allocation's place is its event's)."""
        self.layout = Layout([(i.key, i.numbers) for i in small], [(i.key, i.numbers) for i in large])
        self.shapes = ([(_shape(i.key), i.refs) for i in small], [(_shape(i.key), i.refs) for i in large])
        self._refs: dict[tuple[int, tuple[int, ...]], list[tuple[tuple[Place, ...], ...]]] = {}  # by grow, counts
        self._rules_at: dict[tuple[int, int], list[list[_Rule]]] = {}
        if targets is None or counts is None:
            targets = (self.allocations(small, -1), self.allocations(large, 0))
            counts = (self.layout.counts(-1), self.layout.counts(0))
        self.static: dict[int, list[_Item]] = {}
        self.first_copy: dict[tuple[int, int], _Item] = {}
        self.rules: dict[tuple[Any, ...], _Rule] = {}
        self.lists: dict[tuple[int, int], Layout] = {}  # a static item's growing reference list, as a layout
        for side, (items, grow) in enumerate(((small, -1), (large, 0))):
            for place, item in zip(self.layout.places(grow), items, strict=True):
                if place[0] == "s":
                    self.static.setdefault(place[1], []).append(item)
                elif place[2] == 0 and side == 1:
                    self.first_copy[(place[1], place[3])] = item
        for (index, (one, two)) in self.static.items():
            for number, (a, b) in enumerate(zip(one.refs, two.refs, strict=True)):
                keys = [[(_without_copy(_place(ref, targets[side])), ()) for ref in refs]
                        for side, refs in enumerate((a, b))]
                # a list that keeps its length keeps each item's slot (its target may still move, by its rule)
                self.lists[(index, number)] = Layout(*keys) if len(a) != len(b) else Layout.fixed(len(a))
        for side, (items, grow) in enumerate(((small, -1), (large, 0))):
            for place, item in zip(self.layout.places(grow), items, strict=True):
                for number, refs in enumerate(item.refs):
                    self._observe(place, number, [_place(ref, targets[side]) for ref in refs], counts[side], grow)

    def allocations(self, items: list[_Item], grow: int) -> dict[int, Place]:
        """Each allocation id's place (events only: an allocation's id is its number among the allocations)."""
        places = [place for place, item in zip(self.layout.places(grow), items, strict=True) if item.key[0] is True]
        return dict(enumerate(places))

    def _observe(self, place: Place, number: int, targets: list[Place], counts: list[int], grow: int) -> None:
        if place[0] == "r":
            _, region, copy, offset = place
            copies = self.layout.counts(grow)[region]
            for position, target in enumerate(targets):
                self.rules.setdefault(("r", region, offset, number, position), _Rule()).observe(
                    copy, copies, target, counts)
            return
        items = self.lists[(place[1], number)]
        for item, target in zip(items.places(grow), targets, strict=True):
            copy, copies = (item[2], items.counts(grow)[item[1]]) if item[0] == "r" else (None, 0)
            self.rules.setdefault(_list_slot(place[1], number, item), _Rule()).observe(copy, copies, target, counts)

    def renumbered(self, small: list[_Item], large: list[_Item]) -> _Learnt:
        """This sequence with the numbers of two other traces of the copies (the step at another micro-batch), its
        layout and rules kept: no learning, and the references written once for both. Refused (`NotPeriodic`)
        unless each item's kind and references are as learnt and every copy of a run has the same numbers, which
        is what makes the renumbered model write both traces back."""
        if ([(_shape(i.key), i.refs) for i in small], [(_shape(i.key), i.refs) for i in large]) != self.shapes:
            raise NotPeriodic("the copies' traces at the other micro-batch differ in more than numbers")
        other = copy.copy(self)
        other.static, other.first_copy = {}, {}
        runs: dict[tuple[int, int], tuple[int, ...]] = {}
        for side, (items, grow) in enumerate(((small, -1), (large, 0))):
            for place, item in zip(self.layout.places(grow), items, strict=True):
                if place[0] == "s":
                    other.static.setdefault(place[1], []).append(item)
                    continue
                if runs.setdefault((place[1], place[3]), item.numbers) != item.numbers:
                    raise NotPeriodic("the copies of a repeating run differ at the other micro-batch")
                if place[2] == 0 and side == 1:
                    other.first_copy[(place[1], place[3])] = item
        return other

    def write(self, grow: int, counts: list[int]) -> list[tuple[_Item, Place]]:
        """The items with `grow` more copies per region, each reference as its target's place (`counts`: the
        copies of the runs the targets are in)."""
        places = self.layout.places(grow)
        key = (grow, tuple(counts))
        if key not in self._refs:  # shared with the renumbered copies: the same references at every micro-batch
            self._refs[key] = [self._references(place, grow, counts) for place in places]
        out = []
        for place, refs in zip(places, self._refs[key], strict=True):
            if place[0] == "s":
                one, two = self.static[place[1]]
                numbers = tuple(b + grow * (b - a) for a, b in zip(one.numbers, two.numbers, strict=True))
                out.append((_Item(two.key, numbers, refs), place))
            else:
                template = self.first_copy[(place[1], place[3])]
                out.append((_Item(template.key, template.numbers, refs), place))
        return out

    def _references(self, place: Place, grow: int, counts: list[int]) -> tuple[tuple[Place, ...], ...]:
        """The item at `place`'s references, each as its target's place."""
        if place[0] == "s":
            two = self.static[place[1]][1]
            refs: list[tuple[Place, ...]] = []
            for number in range(len(two.refs)):
                items = self.lists[(place[1], number)]
                sizes = items.counts(grow)
                refs.append(tuple(
                    self.rules[_list_slot(place[1], number, item)].target(
                        item[2] if item[0] == "r" else None, counts, sizes[item[1]] if item[0] == "r" else 0)
                    for item in items.places(grow)))
            return tuple(refs)
        _, region, copy_, offset = place
        own = self.layout.counts(grow)[region]
        return tuple(tuple(rule.target(copy_, counts, own) for rule in rules)
                     for rules in self._run_rules(region, offset))

    def _run_rules(self, region: int, offset: int) -> list[list[_Rule]]:
        """The rules of a run's record at `offset`, per reference list and slot (looked up once per record)."""
        if (region, offset) not in self._rules_at:
            template = self.first_copy[(region, offset)]
            self._rules_at[(region, offset)] = [
                [self.rules[("r", region, offset, number, position)] for position in range(len(refs))]
                for number, refs in enumerate(template.refs)]
        return self._rules_at[(region, offset)]


def _shape(key: tuple[Any, ...]) -> tuple[Any, ...]:
    """An item's key without the size a free's key holds (its allocation's), which moves with the micro-batch."""
    return key if key[0] is not False else (False, *key[2:])


def _place(ref: int, targets: dict[int, Place]) -> Place:
    return targets[ref] if ref >= 0 else ("x", ref)


def _without_copy(place: Place) -> tuple[Any, ...]:
    return (place[0], place[1], place[3]) if place[0] == "r" else place


def _list_slot(static: int, number: int, item: Place) -> tuple[Any, ...]:
    return ("s", static, number, *_without_copy(item))


def _event_items(trace: AllocationTrace) -> list[_Item]:
    """A free's key holds what it frees (size, stream), so that runs of frees repeat as their allocations do."""
    allocated = {e.id: e for e in trace.events if e.alloc}
    return [_Item((e.alloc, e.stream, trace.tags.get(e.id)) if e.alloc else
                  (False, allocated[e.id].size, allocated[e.id].stream, trace.tags.get(e.id)), (e.size,),
                  () if e.alloc else ((e.id,),)) for e in trace.events]


def _op_items(trace: AllocationTrace) -> list[_Item]:
    return [_Item((op.name, op.kind, op.stream, op.phase, op.dtype, op.group, op.mnk is None),
                  (op.flops, op.bytes, *(op.mnk or ())), (op.reads, op.writes)) for op in trace.ops]


def comparable(trace: AllocationTrace) -> AllocationTrace:
    """The trace as a periodic one is written: ops without what only `--gpu local` uses (key, spec)."""
    if all(op.key is None and op.spec is None for op in trace.ops):
        return trace  # nothing to take off (plan's and predict's traces keep neither)
    return dataclasses.replace(trace, ops=[dataclasses.replace(op, key=None, spec=None) for op in trace.ops])


class LayerPeriodic:
    """The step's trace at any block count from traces at `small` and `large` blocks (large - small: one period)."""

    def __init__(self, small: AllocationTrace, large: AllocationTrace, small_blocks: int, large_blocks: int) -> None:
        self.small_blocks, self.large_blocks = small_blocks, large_blocks
        small_events, large_events = _event_items(small), _event_items(large)
        self.events = _Learnt(small_events, large_events)
        targets = (self.events.allocations(small_events, -1), self.events.allocations(large_events, 0))
        counts = (self.events.layout.counts(-1), self.events.layout.counts(0))
        self.ops = _Learnt(_op_items(small), _op_items(large), targets, counts)
        self.marks: dict[str, tuple[int, int]] = {}
        self.small_marks, self.large_marks = dict(small.marks), dict(large.marks)
        for phase, one in small.marks.items():
            two = large.marks.get(phase)
            if two is None or any(r.start < two < r.start + r.period * r.copies for r in self.events.layout.regions):
                raise NotPeriodic(f"the {phase} phase begins inside a repeating run")
            self.marks[phase] = (one, two)
        for trace, blocks in ((small, small_blocks), (large, large_blocks)):
            if self.at(blocks) != comparable(trace):
                raise NotPeriodic(f"the model learnt does not write the {blocks}-block trace back")
        # and every reference finds a target one period deeper: of the rules that fit both traces, one that sends
        # a copy past its run's end where no static item was seen (deepseek_v2's, rwkv's copies of 3 and 4) is
        # refused here, and the caller goes on to copies one period deeper, as where no rule fits
        self.at(2 * large_blocks - small_blocks)

    def renumbered(self, small: AllocationTrace, large: AllocationTrace) -> LayerPeriodic:
        """The model of the copies' traces at another micro-batch (`small`, `large`), from this one: its layout,
        rules and written references kept, their numbers taken (`_Learnt.renumbered`). A fifth of learning and
        writing them anew (llama-3.1-8b's 32 layers from 3 and 4); NotPeriodic where they differ in more than
        numbers, or their phases begin elsewhere (the caller learns them anew)."""
        if small.marks != self.small_marks or large.marks != self.large_marks:
            raise NotPeriodic("the copies' phases begin elsewhere at the other micro-batch")
        other = copy.copy(self)
        other.events = self.events.renumbered(_event_items(small), _event_items(large))
        other.ops = self.ops.renumbered(_op_items(small), _op_items(large))
        return other

    def at(self, blocks: int) -> AllocationTrace:
        period = self.large_blocks - self.small_blocks
        grow, rest = divmod(blocks - self.large_blocks, period)
        if rest:
            raise NotPeriodic(f"{blocks} blocks is not a whole number of {period}-block periods past "
                              f"{self.large_blocks}")
        counts = self.events.layout.counts(grow)
        if min(counts, default=1) < 0:
            raise NotPeriodic(f"{blocks} blocks is fewer than the traces had")
        events: list[TraceEvent] = []
        tags: dict[int, str] = {}
        number: dict[Place, int] = {}
        for item, place in self.events.write(grow, counts):
            alloc, stream, tag = item.key[0], item.key[1], item.key[-1]
            if alloc:
                number[place] = len(number)
                if tag is not None:
                    tags[number[place]] = tag
                events.append(TraceEvent(True, number[place], item.numbers[0], stream))
            else:
                events.append(TraceEvent(False, _id(item.refs[0][0], number), item.numbers[0], ""))
        ops = []
        for item, _ in self.ops.write(grow, counts):
            name, kind, stream, phase, dtype, group, no_mnk = item.key
            flops, size, *mnk = item.numbers
            reads, writes = (tuple(_id(target, number) for target in refs) for refs in item.refs)
            ops.append(OpRecord(name, kind, stream, phase, flops, size, dtype, reads, writes,
                                None if no_mnk else tuple(mnk), group))  # type: ignore[arg-type]
        marks = {phase: two + grow * (two - one) for phase, (one, two) in self.marks.items() }
        return AllocationTrace(frees_in_order(events, marks), tags, marks, ops)


def _id(target: Place, number: dict[Place, int]) -> int:
    if target[0] == "x":
        return int(target[1])
    if target not in number:
        raise NotPeriodic(f"a reference to {target}, which the written trace does not have")
    return number[target]


def at_other_batch(small: AllocationTrace, small_other: AllocationTrace, large: AllocationTrace) -> AllocationTrace:
    """The larger copy's trace at the micro-batch of `small_other`, from `large` (at `small`'s micro-batch): each
    size, FLOP count, byte count and matmul dimension moved by what the same record's moved from `small` to
    `small_other` (a record of a repeating run: what that record moved in every copy of the run in `small`, which
    must agree). Refused (`NotPeriodic`) where the smaller copy's two traces differ in
    more than numbers, or a record that grows with the blocks also moves with the micro-batch."""
    if extrapolated(small, small_other, 0, 1) is None or extrapolated_ops(small, small_other, 0, 1) is None:
        raise NotPeriodic("the smaller copy's traces at the two micro-batches differ in more than sizes")
    event_moves = _moves(_event_items(small), _event_items(large),
                         [(b.size - a.size,) for a, b in zip(small.events, small_other.events, strict=True)])
    events = [dataclasses.replace(event, size=event.size + move[0])
              for event, move in zip(large.events, event_moves, strict=True)]
    before, after = _op_items(small), _op_items(small_other)
    op_moves = _moves(before, _op_items(large), [tuple(b - a for a, b in zip(one.numbers, two.numbers, strict=True))
                                                 for one, two in zip(before, after, strict=True)])
    ops = []
    for op, move in zip(large.ops, op_moves, strict=True):
        flops, size, *mnk = (number + step for number, step in zip((op.flops, op.bytes, *(op.mnk or ())), move,
                                                                     strict=True))
        ops.append(dataclasses.replace(op, flops=flops, bytes=size, mnk=None if op.mnk is None else tuple(mnk),
                                       key=None, spec=None))
    return AllocationTrace(events, dict(large.tags), dict(large.marks), ops)


def _moves(small: list[_Item], large: list[_Item], moved: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """What each of `large`'s items moves by, from what each of `small`'s moved (`moved`), by their places."""
    layout = Layout([(i.key, i.numbers) for i in small], [(i.key, i.numbers) for i in large])
    by_place: dict[Place, tuple[int, ...]] = {}
    statics: dict[Place, tuple[int, ...]] = {}
    for place, item, move in zip(layout.places(-1), small, moved, strict=True):
        key = _in_every_copy(place)
        if by_place.setdefault(key, move) != move:
            raise NotPeriodic("the copies of a repeating run move differently with the micro-batch")
        if place[0] == "s":
            statics[key] = item.numbers
    out = []
    for place, item in zip(layout.places(0), large, strict=True):
        key = _in_every_copy(place)
        if key not in by_place:
            raise NotPeriodic("a repeating run the smaller copy lacks")
        move = by_place[key]
        if any(move) and place[0] == "s" and statics[key] != item.numbers:
            raise NotPeriodic("a record that grows with the blocks also moves with the micro-batch")
        out.append(move)
    return out


def _in_every_copy(place: Place) -> Place:
    """A place without its copy: a static item's own, a run's record (region, offset), alike in every copy."""
    return place if place[0] == "s" else (place[1], place[3])
