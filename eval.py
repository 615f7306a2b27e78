"""Evaluate a checkpoint on a dataset split by the official COCO protocol (FACTS.md §8).

    python eval.py --weights=runs/custom                  # a train.py workdir: its dataset and model
    python eval.py --config=configs/custom.py:gelan-c --config.data.path=data.yaml \\
        --weights=gelan-c-custom.msgpack                  # the dataset as train.py takes it
    python eval.py --model=gelan-c --weights=gelan-c.pt --data_dir=~/tfds --dataset=coco \\
        --split=validation --annotations=instances_val2017.json --out_dir=runs/eval

The dataset is named as train.py names it: ``--config`` with any ``--config.data.*`` field (a
YOLO data YAML, COCO JSONs, a prepared TFDS dataset or the shapes set; a YOLO or COCO source is
prepared on first use, as train.py does), else the config saved with a train.py workdir given as
``--weights``; ``--data_dir`` with ``--dataset`` is the short form for a prepared TFDS dataset.
The split is the config's ``data.eval_split`` unless ``--split`` says otherwise (a YOLO YAML's
``test`` is ``--split=test``).

Prints the COCO table, the per-class AP table and images/s; writes into ``--out_dir``:
predictions.json (COCO results, original pixels, the dataset's category ids), per_class_ap.csv,
metrics.json, pr_curve.png and confusion_matrix.png. Without COCO annotations (``--annotations``,
or the config's ``data.eval_annotations``) the ground truth is built from the dataset's own boxes
(AP_small/medium/large then use box areas, not COCO's segment areas).
"""
import csv
import io
import json
import os
import sys

from yolov9_jax import xla_flags

# Before JAX starts: XLA:CPU's default convolutions run this detector ~25 % slower
# (gelan-t at 640, batch 1: 7.8 -> 9.9 images/s on 2 cores; benchmarks/deploy.py).
xla_flags.use_fast_cpu_convolutions()

from absl import flags  # noqa: E402

from yolov9_jax import paths, run_config, weights  # noqa: E402
from yolov9_jax.evaluation import evaluator, plots  # noqa: E402

# This script's own flags (detect.py has some of the same names; both run in one test process).
FLAGS = flags.FlagValues()
run_config.define_model_flags(FLAGS)
flags.DEFINE_string("data_dir", None, "with --dataset: the TFDS data_dir holding a prepared "
                    "dataset (short for --config.data.source=tfds --config.data.data_dir=...)",
                    flag_values=FLAGS)
flags.DEFINE_string("dataset", None, "with --data_dir: the prepared TFDS dataset's name",
                    flag_values=FLAGS)
flags.DEFINE_string("split", None, "split to evaluate (default: the config's data.eval_split, "
                    "else validation)", flag_values=FLAGS)
flags.DEFINE_string("annotations", None, "COCO instances JSON of the split (official numbers; "
                    "default: the config's data.eval_annotations)", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "global batch, divisible by the number of devices",
                     flag_values=FLAGS)
flags.DEFINE_boolean("rectangular", True, "the official batches: sorted by aspect ratio, each "
                     "padded to its own rectangle (up to image_size + 32), one compilation per "
                     "batch shape; --norectangular: image_size squares (one compilation, faster)",
                     flag_values=FLAGS)
flags.DEFINE_string("out_dir", "runs/eval", "where the results are written", flag_values=FLAGS)
flags.DEFINE_boolean("help", False, "show this help", flag_values=FLAGS)


def _source(data_dir, dataset, split):
  """(random-access source, label -> category id, class names) of a prepared dataset split."""
  import tensorflow_datasets as tfds

  from yolov9_jax.data import coco_format
  root = paths.user_path(data_dir)
  if not (root / dataset).is_dir():
    raise FileNotFoundError(f"no prepared dataset {dataset!r} under {root} (expected the folder "
                            f"{root / dataset}; write it with coco_format.prepare)")
  builder = tfds.builder(dataset, data_dir=os.fspath(root))
  if split not in builder.info.splits:
    raise ValueError(f"dataset {dataset!r} in {root} has no split {split!r}; it has "
                     f"{sorted(builder.info.splits)}")
  class_names = builder.info.features["objects"]["label"].names
  return builder.as_data_source(split=split), coco_format.category_ids(builder), class_names


def _per_class_table(per_class_ap):
  width = max([len("class")] + [len(name) for name in per_class_ap])
  lines = [f"{'class':<{width}}  {'AP':>6}  {'AP50':>6}"]
  for name, ap in per_class_ap.items():
    lines.append(f"{name:<{width}}  {ap['AP']:6.3f}  {ap['AP50']:6.3f}")
  return "\n".join(lines)


def main(argv):
  run_config.parse(FLAGS, argv)
  if FLAGS.help:
    print(__doc__ + "\n" + FLAGS.get_help())
    return None
  if FLAGS.weights is None:
    raise ValueError("eval.py needs --weights")
  if not paths.user_path(FLAGS.weights).exists():  # before the dataset is opened
    raise FileNotFoundError(f"weights file or checkpoint directory "
                            f"{paths.user_path(FLAGS.weights)} does not exist")
  config = run_config.training_config(FLAGS.config, FLAGS.weights)
  model, image_size = run_config.model_and_image_size(FLAGS, config, "eval.py")
  if FLAGS.dataset or FLAGS.data_dir:
    if not (FLAGS.dataset and FLAGS.data_dir):
      raise ValueError("--dataset and --data_dir go together (a prepared TFDS dataset)")
    source, category_ids, class_names = _source(FLAGS.data_dir, FLAGS.dataset,
                                                FLAGS.split or "validation")
    annotations = FLAGS.annotations
  elif config is not None:
    data_config = config.data
    if FLAGS.split:
      data_config.eval_split = FLAGS.split
    data = run_config.open_dataset(data_config)
    source, category_ids, class_names = data.eval, data.category_ids, data.class_names
    annotations = FLAGS.annotations or data.eval_annotations
  else:
    raise ValueError("eval.py needs a dataset: --config (and --config.data.* fields, as train.py "
                     "takes them), a train.py workdir as --weights, or --data_dir with --dataset")
  variables, _ = weights.load(FLAGS.weights, model, num_classes=len(category_ids))
  annotations = paths.user_path(annotations) if annotations else None
  if annotations and not annotations.is_file():
    raise FileNotFoundError(f"annotations file {annotations} does not exist")
  result = evaluator.evaluate(model, variables, source, category_ids,
                              class_names=class_names, image_size=image_size,
                              batch_size=FLAGS.batch_size, ground_truth=annotations,
                              rectangular=FLAGS.rectangular)
  with paths.local_dir(FLAGS.out_dir) as out_dir:  # a remote --out_dir gets the files at the end
    _write_results(out_dir, result, category_ids, class_names)
  print(result.metrics["table"])
  print(_per_class_table(result.per_class_ap))
  print(f"{result.images} images, {result.images_per_second:.1f} images/s "
        f"(pipeline + network + NMS; {len(result.batch_shapes)} batch shapes compiled in "
        f"{result.compile_seconds:.1f} s); "
        f"NMS candidates over the cap: {result.candidates_dropped}")
  print(f"wrote {paths.user_path(FLAGS.out_dir)}")
  return result


def _write_results(out_dir, result, category_ids, class_names):
  """predictions.json, metrics.json, per_class_ap.csv and the two plots, into ``out_dir``."""
  (out_dir / "predictions.json").write_text(json.dumps(result.predictions.to_coco(category_ids)))
  (out_dir / "metrics.json").write_text(json.dumps(
      {**{k: v for k, v in result.metrics.items() if k != "table"}, "images": result.images,
       "images_per_second": result.images_per_second, "rectangular": FLAGS.rectangular,
       "batch_shapes_hw": [list(shape) for shape in result.batch_shapes],
       "candidates_dropped": result.candidates_dropped}, indent=1))
  table = io.StringIO()
  writer = csv.writer(table)
  writer.writerow(["class", "category_id", "AP", "AP50"])
  for (name, ap), category_id in zip(result.per_class_ap.items(), category_ids):
    writer.writerow([name, category_id, f"{ap['AP']:.5f}", f"{ap['AP50']:.5f}"])
  (out_dir / "per_class_ap.csv").write_text(table.getvalue())
  plots.save_pr_curves(result.pr_recall, result.pr_precision, class_names, out_dir / "pr_curve.png")
  plots.save_confusion_matrix(result.confusion_matrix, class_names, out_dir / "confusion_matrix.png")


if __name__ == "__main__":
  try:
    main(sys.argv)
  except (FileNotFoundError, ValueError, NotImplementedError, flags.Error) as error:
    sys.exit(f"eval.py: {error}")
