"""A batched case's own drift baseline: the same setup at batch 1 making the image of every seed of its batches, so
that every image of a batch is compared with the same seed's unbatched image, not only the first of each batch."""

from __future__ import annotations

from flux2bench.axes import batch
from flux2bench.drift_baseline import own_drift_baseline, pick_drift_baseline
from flux2bench.drift import compare_outputs
from flux2bench.runner.drift_plan import drift_baselines_to_run
from records import gradient_image, result, save_outputs, with_noise


def test_the_drift_baseline_of_a_batch_has_a_seed_for_each_of_its_images():
    batched = result(block="b", precision="fp8", batch_size=4, seeds=(0, 10))
    reference = own_drift_baseline(batched.case)
    assert reference.settings["batch_size"] == 1 and reference.settings["precision"] == "fp8"
    assert reference.seeds == (0, 1, 2, 3, 10, 11, 12, 13)
    assert batch.AXIS.own_drift_baseline(result(seeds=(0,)).case) is None  # batch 1 is measured against bf16


def test_a_batch_1_case_of_the_first_seed_only_is_no_drift_baseline():
    first_seed_only = result(block="a", precision="fp8", seeds=(0,))
    batched = result(block="b", precision="fp8", batch_size=2, seeds=(0,))
    assert pick_drift_baseline(batched.case, [first_seed_only]) is None
    every_seed = result(block="a", precision="fp8", seeds=(0, 1, 2))  # more seeds than needed serve as well
    assert pick_drift_baseline(batched.case, [first_seed_only, every_seed]) is every_seed


def test_a_batch_1_case_timed_differently_serves_as_the_drift_baseline_of_a_batch():
    # scenarios/throughput.yaml: the batch-1 block makes seeds 0 to 7 in one timed call each, the batched blocks
    # two timed calls after a warm-up; the images are the same, so no third compilation is run for them
    batch_1 = result(block="b1", precision="fp8", seeds=tuple(range(8)), repeats=1, warmup=1)
    batched = result(block="b2", precision="fp8", batch_size=2, seeds=(0,), repeats=2, warmup=2)
    assert pick_drift_baseline(batched.case, [batch_1]) is batch_1
    assert drift_baselines_to_run([batched.case], [batch_1, batched], attempt=0) == []
    other_steps = result(block="b1", precision="fp8", seeds=tuple(range(8)), repeats=1, steps=9)
    assert pick_drift_baseline(batched.case, [other_steps]) is None


def test_the_runner_runs_one_drift_baseline_per_setup_with_the_seeds_of_all_its_batches():
    cases = [result(block=f"b{size}", precision="fp8", batch_size=size, seeds=(0,)) for size in (2, 4, 8)]
    (reference,) = drift_baselines_to_run([r.case for r in cases], cases, attempt=0)
    assert reference.block == "b2.baseline" and reference.seeds == tuple(range(8))
    assert all(pick_drift_baseline(r.case, [*cases, result(block="b2.baseline", precision="fp8", seeds=tuple(range(8)))])
               is not None for r in cases)


def batch_of_two(run_dir, images):
    """A case of one call of 2 images from seed 0, with its two outputs: the images of seeds 0 and 1."""
    batched = result(block="b", precision="fp8", batch_size=2, seeds=(0,), prompts=("a red fox",))
    written = save_outputs(run_dir, result(block="b-images", seeds=(0, 1), prompts=("a red fox",)), images)
    batched.outputs = written.outputs
    return batched


def test_every_image_of_a_batch_is_compared_with_its_seeds_unbatched_image(tmp_path):
    images = [gradient_image(), with_noise(gradient_image(), 4.0, seed=3)]
    reference = save_outputs(tmp_path, result(block="a", precision="fp8", seeds=(0, 1), prompts=("a red fox",)),
                             images)
    # the batch's first image equals the reference's, its second differs: a comparison of the first image alone
    # would call the batch identical
    batched = batch_of_two(tmp_path, [images[0], gradient_image()])
    psnr = compare_outputs(tmp_path, batched, reference).metrics["psnr"]
    assert psnr.method.endswith("; mean over 2 images") and psnr.value < 100


def test_a_reference_lacking_some_seeds_says_over_how_many_of_the_cases_images_it_is(tmp_path):
    images = [gradient_image(), gradient_image()]
    first_only = save_outputs(tmp_path, result(block="a", precision="fp8", seeds=(0,), prompts=("a red fox",)),
                              images[:1])
    batched = batch_of_two(tmp_path, images)
    psnr = compare_outputs(tmp_path, batched, first_only).metrics["psnr"]
    assert "mean over 1 of the case's 2 images" in psnr.method
