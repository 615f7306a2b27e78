"""The built-in demo: the synthetic `shapes` set (3 classes) on the CPU, what `python train.py`
runs with no flags. gelan-t at 160 px with the official recipe, shortened: fewer epochs and a
shorter warm-up floor.

    python train.py                      # = --config=configs/shapes_demo.py --workdir=runs/shapes_demo

Reached (2-core CPU, see README): printed at the end of the run.
"""
from configs import common


def get_config():
  config = common.base()
  config.model.name = "gelan-t"
  config.data.source = "shapes"
  config.data.shapes.update(num_train=512, num_val=128, image_hw=(128, 128))
  config.augment.update(image_size=128, max_boxes=32, close_mosaic_epochs=3,
                        mosaic_partner_window=256, workers=2)
  config.train.update(batch_size=16, epochs=12, log_every_steps=8, checkpoint_every_steps=128)
  # A few hundred updates must do: one per batch of 16 rather than per 64 images, and 3
  # warm-up epochs without the official floor of 100 iterations.
  config.optimizer.update(nominal_batch_size=16, warmup_min_iterations=0)
  config.eval.update(every_epochs=100, batch_size=32)  # once, at the end
  return config
