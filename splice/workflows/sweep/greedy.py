"""A greedy soup (Wortsman et al.) run as a sweep: the ingredients scored in parallel, then the accept/reject pass run
speculatively. The pass is sequential by nature (each decision compares against the soup the decisions before it
made), so each round evaluates the next `speculate` ingredients in parallel, each joined to the current soup; the
decisions up to the first acceptance stand, and what that acceptance invalidates (the evaluations after it, made
against the old soup) is redone in the next round. Every candidate soup is computed by the one formula the
sequential greedy soup uses (`splice.merge.soup.add_to_soup`), so the kept ingredients, the soup and its score are
exactly `splice soup --greedy`'s."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from splice.errors import SpliceError
from splice.merge.soup import GreedyStep
from splice.progress import Progress
from splice.workflows.sweep.candidate import Outcome, SoupCandidate
from splice.workflows.sweep.executors import Executor
from splice.workflows.sweep.study import POLL_SECONDS


@dataclass
class SpeculationCount:
    """What speculation cost and saved: evaluations run in the accept/reject pass, those thrown away because an
    earlier acceptance in their round changed the soup, and rounds (waits for a parallel batch) against the
    sequential pass's one evaluation per round."""

    speculate: int
    evaluations: int = 0
    wasted: int = 0
    rounds: int = 0
    sequential_rounds: int = 0

    @property
    def saved_rounds(self) -> int:
        return self.sequential_rounds - self.rounds


@dataclass
class GreedyOutcome:
    scores: dict[str, float]  # each ingredient's own held-out score
    failed: dict[str, str]  # ingredients whose own evaluation failed, with the error (left out of the soup)
    steps: list[GreedyStep]
    soup_score: float
    kept: list[str]
    speculation: SpeculationCount
    outcomes: list[tuple[SoupCandidate, Outcome]] = field(default_factory=list)  # every evaluation, in order


class GreedyDriver:
    def __init__(self, ingredients: list[str], executor: Executor, speculate: int | None, strict: bool):
        self.ingredients = ingredients
        self.executor = executor
        self.speculate = speculate or executor.slots
        self.strict = strict
        self.number = 0
        self.outcomes: list[tuple[SoupCandidate, Outcome]] = []

    def run(self, on_outcome: Callable[[SoupCandidate, Outcome], None], progress: Progress) -> GreedyOutcome:
        progress.start("greedy soup", 2 * len(self.ingredients) - 1, 0, unit="evaluations")
        try:
            own = self._round([SoupCandidate(0, (path,)) for path in self.ingredients], on_outcome, progress)
            scores = {c.kept[0]: o.score for c, o in own if o.score is not None}
            failed = {c.kept[0]: o.error or "" for c, o in own if o.score is None}
            if not scores:
                raise SpliceError(f"every ingredient's evaluation failed; the first: {next(iter(failed.values()))}")
            order = sorted(scores, key=lambda path: -scores[path])  # stable: equal scores keep the listed order
            steps, kept, best, count = self._accept_or_reject(order, scores, on_outcome, progress)
        finally:
            progress.finish()
        return GreedyOutcome(scores, failed, steps, best, kept, count, self.outcomes)

    def _accept_or_reject(
        self,
        order: list[str],
        scores: dict[str, float],
        on_outcome: Callable[[SoupCandidate, Outcome], None],
        progress: Progress,
    ) -> tuple[list[GreedyStep], list[str], float, SpeculationCount]:
        count = SpeculationCount(self.speculate, sequential_rounds=len(order) - 1)
        kept, best = [order[0]], scores[order[0]]
        steps = [GreedyStep(order[0], best, None, True)]
        position = 1
        while position < len(order):
            window = order[position : position + self.speculate]
            soup = tuple(kept)
            results = self._round([SoupCandidate(0, soup, path) for path in window], on_outcome, progress)
            count.rounds += 1
            count.evaluations += len(results)
            for offset, (candidate, outcome) in enumerate(results):
                path = candidate.ingredient or ""
                score = outcome.score
                accept = score is not None and (score > best if self.strict else score >= best)
                steps.append(GreedyStep(path, scores[path], score, accept, tie=accept and score == best))
                position += 1
                if accept:
                    assert score is not None
                    kept.append(path)
                    best = score
                    count.wasted += len(results) - offset - 1  # made against the soup this acceptance replaced
                    break
        return steps, kept, best, count

    def _round(
        self,
        candidates: list[SoupCandidate],
        on_outcome: Callable[[SoupCandidate, Outcome], None],
        progress: Progress,
    ) -> list[tuple[SoupCandidate, Outcome]]:
        """Evaluate `candidates` (numbered here, in order) on the executor; their outcomes in the same order."""
        numbered = []
        for candidate in candidates:
            numbered.append(SoupCandidate(self.number, candidate.kept, candidate.ingredient))
            self.number += 1
        pending = list(numbered)
        by_number: dict[int, Outcome] = {}
        while pending or len(by_number) < len(numbered):
            while pending and len(numbered) - len(pending) - len(by_number) < self.executor.slots:
                self.executor.submit(pending.pop(0))
            outcome = self.executor.next_outcome(POLL_SECONDS)
            if outcome is not None:
                by_number[outcome.number] = outcome
        results = [(c, by_number[c.number]) for c in numbered]
        for candidate, outcome in results:
            self.outcomes.append((candidate, outcome))
            on_outcome(candidate, outcome)
        progress.advance(len(results), 0)
        return results
