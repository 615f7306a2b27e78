"""COCO 2017 at 640 with the official recipe (hyp.scratch-high, 500 epochs, close mosaic 15).

    python train.py --config=configs/coco.py:yolov9-c --workdir=runs/yolov9-c \
        --config.data.data_dir=$TFDS_DATA_DIR --config.data.eval_annotations=$COCO/annotations/instances_val2017.json

The argument is the model: any of gelan-t/s/m/c/e, yolov9-t/s/m/c/e (default yolov9-c). The
dataset is TFDS coco/2017 prepared as array_record (docs/training.md); the published numbers
(FACTS.md §9) were trained at a global batch of 128 (8 GPUs x 16) or 64.
"""
from configs import common


TRAIN_IMAGES = 118_287  # train2017: one epoch of the schedules


def get_config(model="yolov9-c"):
  config = common.base()
  config.model.name = common.known_model(model, "configs/coco.py")
  config.model.dtype = "bfloat16"
  config.data.update(source="tfds", name="coco/2017", train_split="train", eval_split="validation")
  config.augment.image_size = 640
  config.train.batch_size = 128
  return config
