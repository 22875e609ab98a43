import pytest

from scenes import corpus


def test_generator_is_deterministic_for_a_seed():
    a = [corpus.sample(5, i) for i in range(20)]
    b = [corpus.sample(5, i) for i in range(20)]
    assert [(s.question, s.answer, s.image.tobytes()) for s in a] == [(s.question, s.answer, s.image.tobytes()) for s in b]
    c = [corpus.sample(6, i) for i in range(20)]
    assert [s.image.tobytes() for s in a] != [s.image.tobytes() for s in c]


def test_splits_use_disjoint_seeds():
    seeds = corpus.SPLIT_SEEDS
    assert len(set(seeds.values())) == 3
    train = {corpus.sample(seeds["train"], i).key for i in range(100)}
    test = {corpus.sample(seeds["test"], i).key for i in range(100)}
    assert not train & test


def test_answers_follow_the_scene():
    for i in range(200):
        s = corpus.sample(9, i, task="caption")
        assert s.answer.split(":")[0] in ("One shape", "Two shapes", "Three shapes")
        o = corpus.sample(9, i, task="ocr")
        assert o.answer.startswith('The text says "') and o.question == corpus.PROMPTS["ocr"]
        p = corpus.sample(9, i, task="position")
        assert any(p.answer.endswith(f"at the {pos}.") for pos in corpus.POSITIONS)


def test_every_task_is_drawn():
    tasks = {corpus.sample(1, i).task for i in range(300)}
    assert tasks == set(corpus.TASKS)


def test_demo_shards_carry_the_answer(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.demo_data import write_demo_data

    paths = write_demo_data(str(tmp_path), num_samples=5, fmt="parquet")
    table = pq.read_table(paths[0].removeprefix("file://"))
    assert table.num_rows == 5 and {"key", "image", "question", "task", "answer"} <= set(table.column_names)


def test_every_question_has_a_kind_and_each_kind_is_asked():
    from training.evaluate import question_kind

    kinds = {question_kind(corpus.sample(5, i).question) for i in range(400)}
    assert kinds == {"caption", "ocr", "count", "color", "shape", "exists", "position"}
    assert question_kind("Is there an orange square?") == "exists"
    with pytest.raises(ValueError):
        question_kind("What is the meaning of life?")


def test_a_curriculum_asks_its_own_questions_about_smaller_scenes_first_then_the_stream():
    from training.train import ground_truth_batches

    a = [corpus.sample(5, i) for i in range(30)]
    b = [corpus.sample(5, i, max_shapes=3) for i in range(30)]
    assert [(s.question, s.answer) for s in a] == [(s.question, s.answer) for s in b]  # the stream is unchanged
    assert all(corpus.sample(5, i, "caption", max_shapes=1).answer.startswith("One shape") for i in range(30))

    batches = ground_truth_batches(lambda items: items, 16, task_mix={"caption": 1.0},
                                   curriculum=[{"steps": 3, "task_mix": {"vqa": 0.5, "position": 0.5},
                                                "max_shapes": 2}])
    first = [next(batches) for _ in range(3)]
    questions = [q for batch in first for _, q, _ in batch]
    assert "Describe the image." not in questions and any(q.startswith("Where is") for q in questions)
    assert not any(a == "There are three shapes." for batch in first for _, _, a in batch)
    then = next(batches)
    assert all(q == "Describe the image." for _, q, _ in then)


def test_answers_are_tallied_per_kind_of_question():
    from training.evaluate import tally_by_kind

    samples = [corpus.sample(5, i, task="vqa") for i in range(40)]
    answers = [s.answer if i % 2 else "wrong" for i, s in enumerate(samples)]
    by_kind = tally_by_kind(samples, answers, {})
    assert sum(n for _, n in by_kind.values()) == 40
    assert sum(r for r, _ in by_kind.values()) == 20
    assert set(by_kind) <= {"count", "color", "shape", "exists"}


def test_lookup_answers_are_tallied_by_whose_attribute_they_give():
    """A model that perceives every shape but answers about the wrong one is told apart from one that is wrong."""
    from training.evaluate import answer_about, binding_lines, question_kind, tally_binding

    samples = [s for i in range(200) if len((s := corpus.sample(5, i, task="position")).scene.shapes) > 1][:30]
    samples += [s for i in range(200) if question_kind((s := corpus.sample(6, i, task="vqa")).question) == "color"][:30]
    answers, want = [], {}
    for i, s in enumerate(samples):
        kind = question_kind(s.question)
        asked = next(sh for sh in s.scene.shapes if answer_about(kind, sh, sh) == s.answer)
        other = next((sh for sh in s.scene.shapes if answer_about(kind, asked, sh) != s.answer), None)
        pick = "asked" if i % 3 == 0 or other is None else "another" if i % 3 == 1 else "neither"
        answers.append({"asked": s.answer, "neither": "The sky is plaid.",
                        "another": other and answer_about(kind, asked, other)}[pick])
        row = want.setdefault(len(s.scene.shapes), {"asked": 0, "another": 0, "neither": 0})
        row[pick] += 1
    got = tally_binding(samples, answers, {})
    assert got == want and sum(r["another"] for r in got.values()) >= 10
    assert len(binding_lines(got)) == 2 + len(got)
    assert tally_binding([corpus.sample(5, 0, task="caption")], ["x"], {}) == {}


@pytest.mark.parametrize("kind", corpus.VQA_KINDS)
def test_a_vqa_kind_can_be_asked_for_and_the_scene_stays_the_streams(kind):
    """A mix may name a kind of vqa question (e.g. more exists questions): the row is a vqa row of that kind
    about the same scene the stream draws at that index, and a vqa row of that kind is unchanged."""
    from training.evaluate import question_kind

    for i in range(40):
        s, plain = corpus.sample(5, i, task=kind), corpus.sample(5, i, task="vqa")
        assert s.task == "vqa" and question_kind(s.question) == kind and s.scene == plain.scene
        if question_kind(plain.question) == kind:
            assert (s.question, s.answer) == (plain.question, plain.answer)
