"""Fine-tune on your own data with the official recipe (hyp.scratch-high, FACTS.md §6):

    python train.py --config=configs/custom.py:gelan-c --config.data.path=data.yaml \\
        --config.model.init_from=gelan-c.pt --workdir=runs/custom

``data.path`` is a YOLO data YAML (``path``, ``train``, ``val``, ``names``); for COCO JSONs use
``--config.data.source=coco --config.data.train_annotations=train.json
--config.data.train_images=images/train --config.data.eval_annotations=val.json
--config.data.eval_images=images/val``. Either is prepared on first use into ``data.data_dir``
(default .cache/datasets) and reused while unchanged; the preparation report is printed and saved
as the workdir's prepared.json. ``model.init_from`` takes the official .pt / .safetensors
releases or one of our workdirs; the class head is re-initialised when the number of classes
differs, every other weight is transferred.

The argument is the model (gelan-t/s/m/c/e, yolov9-t/s/m/c/e; default gelan-c). The recipe: the
official single-GPU command (batch 16, 640 px, nominal batch 64 through gradient accumulation,
mosaic closed for the last 15 epochs, SGD lr0 0.01 with 3 warm-up epochs, EMA), for 100 epochs
and evaluated after every epoch as the official trainer does (the best checkpoint is kept);
bfloat16 compute (on a CPU: --config.model.dtype=float32).
"""
from configs import common


def get_config(model="gelan-c"):
  config = common.base()
  config.model.name = common.known_model(model, "configs/custom.py")
  config.model.dtype = "bfloat16"
  config.data.update(source="yolo", data_dir="")
  config.augment.image_size = 640
  config.train.update(batch_size=16, epochs=100)
  config.eval.every_epochs = 1
  return config
