"""The garbage collector's plan (``domain.gc``), pure: nothing a remaining row refers to is ever
planned for deletion, nor anything young, nor a version's weights, nor anything of a training
that has not ended; and a plan carried out leaves nothing for the next one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from selfie_lora.domain.gc import (
    Blob,
    DatasetRef,
    GcPlan,
    GcPolicy,
    GcSummary,
    GenerationRef,
    Kind,
    Owner,
    References,
    TrainingRef,
    WorkFolder,
    format_bytes,
    plan_collection,
)
from selfie_lora.services.layout import (
    chart_key,
    checkpoint_key,
    generation_image_key,
    grid_key,
    manifest_key,
    original_key,
    owner_of,
    photo_key,
    probe_image_key,
    reference_key,
    sample_key,
    weights_key,
)

NOW = datetime(2026, 6, 1, tzinfo=UTC)
POLICY = GcPolicy(grace=timedelta(days=1), dataset_age=timedelta(days=7),
                  generation_age=timedelta(days=30))
SHAS = [c * 64 for c in "abcdef"]
DATASETS = ["d1", "d2", "d3", "d4"]
GENERATIONS = ["g1", "g2", "g3"]
TRAININGS = ["t1", "t2", "t3"]
VERSIONS = ["11111111-aaaa", "22222222-bbbb", "33333333-cccc"]
MODELS = ["m1", "m2"]
WEIGHTS = [weights_key(c * 64) for c in "123"]
ORIGINALS = [original_key(c * 64) for c in "789"]


def blob(key: str, *, age: timedelta, size: int = 10) -> Blob:
    owner = owner_of(key)
    return Blob(key=key, size=size, modified=NOW - age, owner=owner[0] if owner else None,
                owner_id=owner[1] if owner else "")


def test_the_layout_reads_back_every_key_it_makes() -> None:
    assert owner_of(photo_key(SHAS[0])) == (Owner.PHOTO, SHAS[0])
    assert owner_of(original_key(SHAS[0])) == (Owner.ORIGINAL, original_key(SHAS[0]))
    assert owner_of(manifest_key("d1")) == (Owner.DATASET, "d1")
    assert owner_of(reference_key("d1", "dlib/resnet v1")) == (Owner.DATASET, "d1")
    assert owner_of(weights_key(SHAS[1])) == (Owner.WEIGHTS, weights_key(SHAS[1]))
    assert owner_of(generation_image_key("g1", 3)) == (Owner.GENERATION, "g1")
    assert owner_of(probe_image_key("v-1", 2, 1.0)) == (Owner.VERSION, "v-1")
    assert owner_of(grid_key("v-1", "v-2")) == (Owner.COMPARISON, "v-1-v-2")
    assert owner_of(chart_key("m1")) == (Owner.MODEL, "m1")
    assert owner_of(sample_key("t-1", 250)) == (Owner.TRAINING, "t-1")
    assert owner_of(checkpoint_key("t-1", 250)) == (Owner.CHECKPOINT, "t-1")
    # What the layout does not make is nobody's: the collector keeps it.
    for key in ("photos/not-a-sha.jpg", "datasets/d1/other.json", "misc/x", "weights/x.bin",
                "samples/t-1/step-250.jpg", "checkpoints/t-1/step-250.ckpt"):
        assert owner_of(key) is None


def scenario() -> tuple[References, list[Blob], list[WorkFolder]]:
    old, young = timedelta(days=40), timedelta(hours=2)
    refs = References(
        datasets=(
            DatasetRef("d-trained", NOW - old, (SHAS[0], SHAS[1]), trained=True),
            DatasetRef("d-abandoned", NOW - old, (SHAS[1], SHAS[2]), trained=False),
            DatasetRef("d-recent", NOW - timedelta(days=2), (SHAS[3],), trained=False),
        ),
        generations=(GenerationRef("g-old", NOW - old, (generation_image_key("g-old", 0),)),
                     GenerationRef("g-new", NOW - young, (generation_image_key("g-new", 0),))),
        trainings=(TrainingRef("t-done", NOW - old, ended=True),
                   TrainingRef("t-running", NOW - timedelta(hours=5), ended=False),
                   TrainingRef("t-canceled", NOW - old, ended=True, resumable=True)),
        model_ids=frozenset({"m1"}), version_ids=frozenset({"v1"}),
        weights_keys=frozenset({WEIGHTS[0]}))
    blobs = [blob(k, age=old) for k in (
        photo_key(SHAS[0]), photo_key(SHAS[1]), photo_key(SHAS[2]), photo_key(SHAS[3]),
        manifest_key("d-trained"), manifest_key("d-abandoned"), manifest_key("d-recent"),
        reference_key("d-abandoned", "fake"), generation_image_key("g-old", 0),
        generation_image_key("g-new", 0), WEIGHTS[0], WEIGHTS[1], probe_image_key("v1", 0, 1),
        chart_key("m1"), photo_key(SHAS[4]), "misc/unknown.bin", manifest_key("d-gone"),
        sample_key("t-done", 10), sample_key("t-running", 10), sample_key("t-gone", 10),
        checkpoint_key("t-done", 10), checkpoint_key("t-running", 10),
        checkpoint_key("t-canceled", 10), checkpoint_key("t-gone", 10))]
    blobs += [blob(photo_key(SHAS[5]), age=young),  # an upload in flight
              blob(WEIGHTS[2], age=timedelta(hours=3))]  # written by t-running, version to come
    folders = [WorkFolder("t-done", 5, NOW - old), WorkFolder("t-running", 5, NOW),
               WorkFolder("stray-old", 5, NOW - old), WorkFolder("stray-new", 5, NOW)]
    return refs, blobs, folders


def test_a_scenario_plans_exactly_what_nothing_refers_to() -> None:
    refs, blobs, folders = scenario()
    plan = plan_collection(refs=refs, blobs=blobs, work_folders=folders, now=NOW,
                           policy=POLICY, originals={})
    assert plan.datasets == ("d-abandoned",)
    assert plan.generations == ("g-old",)
    assert {(p.kind, p.key) for p in plan.blobs} == {
        (Kind.DATASETS, photo_key(SHAS[2])),  # SHAS[1] is the trained dataset's too
        (Kind.DATASETS, manifest_key("d-abandoned")),
        (Kind.DATASETS, reference_key("d-abandoned", "fake")),
        (Kind.GENERATIONS, generation_image_key("g-old", 0)),
        (Kind.ORPHANS, WEIGHTS[1]),
        (Kind.ORPHANS, photo_key(SHAS[4])),
        (Kind.ORPHANS, manifest_key("d-gone")),
        (Kind.ORPHANS, sample_key("t-gone", 10)),  # its training's row is gone
        # Left by a worker that died after its training ended (the running training's and the
        # resumable canceled one's stay).
        (Kind.ORPHANS, checkpoint_key("t-done", 10)),
        (Kind.ORPHANS, checkpoint_key("t-gone", 10)),
    }
    assert [p.key for p in plan.work_folders] == ["work/stray-old", "work/t-done"]


def test_nothing_is_collected_by_age_when_the_ages_are_unset() -> None:
    refs, blobs, folders = scenario()
    plan = plan_collection(refs=refs, blobs=blobs, work_folders=folders, now=NOW,
                           policy=GcPolicy(grace=timedelta(days=1)), originals={})
    assert plan.datasets == plan.generations == ()
    assert {p.kind for p in plan.blobs} == {Kind.ORPHANS}


def test_originals_go_with_their_last_dataset_and_stay_when_unknown() -> None:
    refs = References(datasets=(DatasetRef("keep", NOW, (), trained=True),
                                DatasetRef("drop", NOW - timedelta(days=30), (), trained=False)))
    blobs = [blob(k, age=timedelta(days=30)) for k in ORIGINALS]
    originals = {"keep": frozenset({ORIGINALS[0]}), "drop": frozenset(ORIGINALS[:2])}
    plan = plan_collection(refs=refs, blobs=blobs, work_folders=(), now=NOW, policy=POLICY,
                           originals=originals)
    assert [(p.kind, p.key) for p in plan.blobs] == [(Kind.DATASETS, ORIGINALS[1]),
                                                     (Kind.ORPHANS, ORIGINALS[2])]
    unknown = plan_collection(refs=refs, blobs=blobs, work_folders=(), now=NOW, policy=POLICY,
                              originals=None)
    assert unknown.blobs == ()


def test_the_summary_counts_bytes_per_kind_and_lists_keys_when_asked() -> None:
    refs, blobs, folders = scenario()
    plan = plan_collection(refs=refs, blobs=blobs, work_folders=folders, now=NOW,
                           policy=POLICY, originals={})
    summary = GcSummary.of_plan(plan, dry_run=True)
    totals = summary.totals()
    assert (totals[Kind.DATASETS].rows, totals[Kind.DATASETS].items,
            totals[Kind.DATASETS].size) == (1, 3, 30)
    assert (totals[Kind.WORK].items, totals[Kind.WORK].size) == (2, 10)
    text = "\n".join(summary.lines())
    assert "dry run" in text
    assert "datasets     would delete 1 row(s), 3 blob(s), 30 B" in text
    assert photo_key(SHAS[2]) not in text
    assert photo_key(SHAS[2]) in "\n".join(summary.lines(verbose=True))
    assert format_bytes(3 * 1024 * 1024) == "3.0 MiB"


# --------------------------------------------------------------------------- the invariant

ages = st.integers(min_value=0, max_value=60 * 24).map(lambda h: timedelta(hours=h))
POOL = sorted({
    *(photo_key(s) for s in SHAS), *ORIGINALS, *WEIGHTS,
    *(manifest_key(d) for d in [*DATASETS, "d-x"]),
    *(reference_key(d, "fake") for d in DATASETS),
    *(generation_image_key(g, i) for g in [*GENERATIONS, "g-x"] for i in (0, 1)),
    *(probe_image_key(v, 0, 1) for v in [*VERSIONS, "v-x"]),
    grid_key(VERSIONS[0], VERSIONS[1]), grid_key(VERSIONS[0], "v-x"),
    *(chart_key(m) for m in [*MODELS, "m-x"]), "misc/x", "photos/x.jpg",
    *(sample_key(t, 10) for t in [*TRAININGS, "t-x"]),
    *(checkpoint_key(t, 10) for t in [*TRAININGS, "t-x"]),
})


@st.composite
def worlds(draw: st.DrawFn) -> tuple[References, list[Blob], list[WorkFolder],
                                     dict[str, frozenset[str]] | None]:
    datasets = tuple(
        DatasetRef(d, NOW - draw(ages), tuple(draw(st.lists(st.sampled_from(SHAS), max_size=3))),
                   trained=draw(st.booleans()))
        for d in draw(st.lists(st.sampled_from(DATASETS), unique=True)))
    generations = tuple(
        GenerationRef(g, NOW - draw(ages), tuple(generation_image_key(g, i)
                                                 for i in range(draw(st.integers(0, 2)))))
        for g in draw(st.lists(st.sampled_from(GENERATIONS), unique=True)))
    trainings = tuple(TrainingRef(t, NOW - draw(ages), ended=(ended := draw(st.booleans())),
                                  resumable=ended and draw(st.booleans()))
                      for t in draw(st.lists(st.sampled_from(TRAININGS), unique=True)))
    versions = draw(st.lists(st.sampled_from(VERSIONS), unique=True))
    refs = References(
        datasets=datasets, generations=generations, trainings=trainings,
        model_ids=frozenset(draw(st.lists(st.sampled_from(MODELS)))),
        version_ids=frozenset(versions),
        weights_keys=frozenset(draw(st.lists(st.sampled_from(WEIGHTS), max_size=len(versions)))))
    blobs = [blob(k, age=draw(ages)) for k in draw(st.lists(st.sampled_from(POOL), unique=True))]
    folders = [WorkFolder(n, 1, NOW - draw(ages))
               for n in draw(st.lists(st.sampled_from([*TRAININGS, "stray"]), unique=True))]
    originals = draw(st.none() | st.just({
        d.id: frozenset(draw(st.lists(st.sampled_from(ORIGINALS)))) for d in datasets}))
    return refs, blobs, folders, originals


def carried_out(refs: References, blobs: list[Blob], folders: list[WorkFolder],
                plan: GcPlan) -> tuple[References, list[Blob], list[WorkFolder]]:
    gone = {p.key for p in (*plan.blobs, *plan.work_folders)}
    left = References(
        datasets=tuple(d for d in refs.datasets if d.id not in plan.datasets),
        generations=tuple(g for g in refs.generations if g.id not in plan.generations),
        trainings=refs.trainings, model_ids=refs.model_ids, version_ids=refs.version_ids,
        weights_keys=refs.weights_keys)
    return (left, [b for b in blobs if b.key not in gone],
            [w for w in folders if f"work/{w.name}" not in gone])


@given(worlds())
def test_nothing_referenced_is_ever_planned_for_deletion(world: tuple[
        References, list[Blob], list[WorkFolder], dict[str, frozenset[str]] | None]) -> None:
    refs, blobs, folders, originals = world
    plan = plan_collection(refs=refs, blobs=blobs, work_folders=folders, now=NOW,
                           policy=POLICY, originals=originals)
    left, _, _ = carried_out(refs, blobs, folders, plan)
    by_key = {b.key: b for b in blobs}
    unfinished = [t.created_at for t in refs.trainings if not t.ended]
    for dataset in refs.datasets:
        if dataset.id in plan.datasets:
            assert not dataset.trained
            assert dataset.created_at < NOW - timedelta(days=7)
    used_photos = {photo_key(s) for d in left.datasets for s in d.photo_hashes}
    trained_photos = {photo_key(s) for d in refs.datasets if d.trained for s in d.photo_hashes}
    kept_rows = ({manifest_key(d.id) for d in left.datasets}
                 | {reference_key(d.id, "fake") for d in left.datasets}
                 | {k for g in left.generations for k in g.image_keys}
                 | {generation_image_key(g.id, i) for g in left.generations for i in (0, 1)}
                 | {probe_image_key(v, 0, 1) for v in refs.version_ids}
                 | {chart_key(m) for m in refs.model_ids}
                 | {sample_key(t.id, 10) for t in refs.trainings}
                 # A checkpoint of a training that runs or can be resumed.
                 | {checkpoint_key(t.id, 10) for t in refs.trainings
                    if not t.ended or t.resumable})
    kept_originals = ({k for d in left.datasets for k in (originals or {}).get(d.id, ())}
                      if originals is not None else set(ORIGINALS))
    for planned in plan.blobs:
        b = by_key[planned.key]
        assert b.owner is not None, "a key the layout does not make is never deleted"
        assert b.modified < NOW - POLICY.grace, "nothing young is deleted"
        assert b.key not in refs.weights_keys, "never a version's weights"
        assert b.key not in used_photos | trained_photos | kept_rows | kept_originals
        if b.owner is Owner.WEIGHTS:
            assert all(b.modified < t for t in unfinished)
        if b.owner is Owner.COMPARISON:
            assert b.key != grid_key(VERSIONS[0], VERSIONS[1]) or not {
                VERSIONS[0], VERSIONS[1]} <= refs.version_ids
    ended = {t.id: t.ended for t in refs.trainings}
    for folder in plan.work_folders:
        assert ended.get(folder.key.removeprefix("work/"), True), "never an unfinished one's"

    # Carried out, the plan leaves nothing for the next collection.
    again = plan_collection(refs=left, blobs=carried_out(refs, blobs, folders, plan)[1],
                            work_folders=carried_out(refs, blobs, folders, plan)[2], now=NOW,
                            policy=POLICY, originals=originals)
    assert again.empty
