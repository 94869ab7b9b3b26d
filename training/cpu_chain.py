"""The whole PMD chain on a CPU from images that installed packages ship, end to end.

teacher (synthetic warps of scikit-image photos) -> hypotheses (on unlabelled crop pairs of those
photos) -> student(s) (PSR + CAL, and optionally the plain-L2 ablation on the same budget) -> PCK on
held-out real pairs (windows of the Middlebury motorcycle stereo pair, which no stage trains on).

Usage::

    python -m semcorr.training.cpu_chain --output-dir runs/pmd-cpu [--losses cal l2] [--num-threads 1]

Each stage is the documented entry point (``train_teacher``, ``generate_hypotheses``,
``distill_student``) with ``training/configs/pmd_cpu_tiny.yaml`` and
``pmd_cpu_tiny_student.yaml``; a stage whose ``final/`` exists is skipped and an interrupted one
resumes from its last checkpoint, so rerunning the command continues a killed run. Results (PCK of
the teacher, the untrained student and each distilled student) are printed as a table and written
to ``OUTPUT_DIR/results.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from semcorr.training.config import PACKAGED_CONFIGS

TEACHER_CONFIG = PACKAGED_CONFIGS / "pmd_cpu_tiny.yaml"
STUDENT_CONFIG = PACKAGED_CONFIGS / "pmd_cpu_tiny_student.yaml"
ALPHAS = (0.05, 0.1)
#: PF-WILLOW's threshold: alpha times the longer side of the keypoint extent in the judged image.
PCK_SETTINGS = {"threshold": "bbox", "average": "pair", "comparison": "<="}


def run_chain(output_dir, losses=("cal",), num_hypotheses: int = 4, num_threads: int | None = 1,
              student_seed: int | None = None, teacher_overrides: dict | None = None,
              student_overrides: dict | None = None, progress: bool = False) -> dict:
    """Run (or continue) the chain under ``output_dir``; returns the results dict (see module doc).

    Args:
        losses: the students to distil, ``"cal"`` and/or ``"l2"`` (``PMDStudentConfig.distillation_loss``).
        student_seed: overrides the student config's seed (initialisation, order, flips); the
            students then live in ``student-<loss>-seed<N>``.
        teacher_overrides, student_overrides: ``{"section.key": value}`` over the two YAML configs.
    """
    from semcorr.hub_datasets.skimage_pairs import main as write_pairs
    from semcorr.training import distill_student, generate_hypotheses, train_teacher
    from semcorr.utils import atomic_write_json

    output_dir = Path(output_dir)
    data = output_dir / "data"
    if not (data / "stereo-test").is_dir() and write_pairs(["--output-dir", str(data)]):
        raise RuntimeError("writing the scikit-image pairs failed; see the message above")
    common = {"run.log_with": [], **({"run.num_threads": num_threads} if num_threads else {})}

    teacher = output_dir / "teacher"
    if not (teacher / "final").is_dir():
        config = train_teacher.TeacherConfig.load(
            TEACHER_CONFIG, {"run.output_dir": str(teacher), **common, **(teacher_overrides or {})})
        train_teacher.train(config, resume=True)

    hypotheses = output_dir / "hypotheses"
    if not (hypotheses / "index.json").is_file():
        code = generate_hypotheses.main([
            "--teacher", str(teacher / "final"), "--pairs", str(data / "train-pairs"), "--output-dir", str(hypotheses),
            "--num-hypotheses", str(num_hypotheses), *(["--num-threads", str(num_threads)] if num_threads else []),
        ])
        if code:
            raise RuntimeError(f"generate_hypotheses failed (exit {code}); see the message above")

    students = {}
    seed = _student_seed() if student_seed is None else student_seed
    for loss in losses:
        student = output_dir / (f"student-{loss}" if student_seed is None else f"student-{loss}-seed{seed}")
        if not (student / "final").is_dir():
            config = distill_student.DistillConfig.load(STUDENT_CONFIG, {
                "data.hypotheses": str(hypotheses), "run.output_dir": str(student), "optim.seed": seed,
                "model.distillation_loss": loss, **common, **(student_overrides or {}),
            })
            distill_student.train(config, resume=True)
        students[loss] = student / "final"

    results = evaluate_chain(teacher / "final", students, data / "stereo-test", seed, progress=progress)
    atomic_write_json(output_dir / ("results.json" if student_seed is None else f"results-seed{seed}.json"), results)
    return results


def evaluate_chain(teacher_dir, students: dict, test_dir, student_seed: int = 0, progress: bool = False) -> dict:
    """PCK on the held-out pairs of the teacher, the untrained student and each distilled student.

    The untrained student is the student's starting point: the teacher's backbone and the seeded
    initialisation of the rest (what ``distill_student`` builds before its first step).
    """
    import datasets
    from transformers import AutoModel

    from semcorr.evaluation import evaluate_model
    from semcorr.training.distill_student import build_student

    test = datasets.load_from_disk(str(test_dir))
    models = {"teacher": AutoModel.from_pretrained(str(teacher_dir))}
    if students:
        models["untrained student"], _ = build_student(Path(teacher_dir), {}, student_seed)
    for loss, directory in students.items():
        models[f"student ({loss})"] = AutoModel.from_pretrained(str(directory))
    results = {"alphas": list(ALPHAS), "settings": PCK_SETTINGS, "num_pairs": len(test), "pck": {}}
    for name, model in models.items():
        scored = evaluate_model(model.eval(), None, dataset=test, protocol=None, alphas=ALPHAS, batch_size=4,
                                progress=progress, **PCK_SETTINGS)
        results["pck"][name] = scored["total"]
    return results


def _student_seed() -> int:
    import yaml

    return int((yaml.safe_load(STUDENT_CONFIG.read_text()).get("optim") or {}).get("seed", 0))


def format_results(results: dict) -> str:
    keys = [f"pck@{alpha:g}" for alpha in results["alphas"]]
    lines = [f"| model | {' | '.join(keys)} |", "|---|" + "---|" * len(keys)]
    for name, scores in results["pck"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * scores[k]:.1f}" for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semcorr.training.cpu_chain", description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", required=True, help="everything goes here; rerun to continue a killed run")
    parser.add_argument("--losses", nargs="+", default=["cal"], choices=["cal", "l2"],
                        help="students to distil (default: cal; add l2 for the ablation)")
    parser.add_argument("--num-hypotheses", type=int, default=4)
    parser.add_argument("--num-threads", type=int, default=1, help="torch threads (default 1; 0 keeps torch's)")
    args = parser.parse_args(argv)
    if args.num_hypotheses < 1:
        print("cpu_chain: error: --num-hypotheses must be >= 1", file=sys.stderr)
        return 2
    try:
        results = run_chain(args.output_dir, tuple(args.losses), args.num_hypotheses, args.num_threads or None,
                            progress=True)
    except ValueError as error:
        print(f"cpu_chain: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # a stage stopped (TrainingError is one)
        print(f"cpu_chain: error: {error}", file=sys.stderr)
        return 1
    print(format_results(results))
    print(f"wrote {Path(args.output_dir) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
