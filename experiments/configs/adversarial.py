"""Adversarial fine-tuning of a trained CLIP's image tower: TeCoA, PMG-AFT, FARE, AdvFLYP.

  python experiments/train.py --config experiments/configs/adversarial.py:METHOD[,digits] \
      --config.init_from=CKPT --workdir DIR

METHOD is tecoa, pmg-aft, fare or advflyp (`clipjax.train.adversarial`; definitions in
robustness.md items 1, 2 and 13). Hyperparameters and their sources:

* tecoa (Mao et al. 2023, `cvlab-columbia/ZSRobust4FoundationModel` README and finetuning.py):
  ImageNet, batch 256, 10 epochs, SGD momentum 0.9, cosine with 1000 warm-up steps; training attack
  PGD eps = alpha = 1/255, 2 steps, random start; classifier 100 * cos against "This is a photo of a
  {}". The README's learning rate is not restated here as verified: the argparse default is 1e-7
  (robustness.md marks the paper's value unverified); `--config.lr` sets it.
* pmg-aft (Wang et al. 2024, PMG_AFT.py): TinyImageNet, batch 256, 10 epochs, SGD lr 5e-5 momentum
  0.9; eps 1/255, 2 steps; KL weights 1 and 1 (summed over the batch, as the official KLDivLoss).
* fare (Schlarmann et al. 2024, `chs20/RobustVLM` train/adversarial_training_clip.py): ImageNet,
  AdamW lr 1e-5, weight decay 1e-4, batch 128, 20,000 steps, 1,400 warm-up steps; inner attack:
  momentum (0.9) sign PGD, eps 4/255 (FARE^4; 2/255 for FARE^2), alpha 1/255, 10 steps.
* advflyp (Xing et al., "Finetune Like You Pretrain", `Sxing2/AdvFLYP` training_epoch.py): the CLIP
  loss on adversarial image-caption pairs plus the feature term ||a - a0|| + ||a - c|| and the logit
  term KL(a || a0) + KL(a || c), weights 1 and 1 as the official code (`advflyp_feature_weight`,
  `advflyp_logit_weight`); eps and steps follow TeCoA's training attack.

TeCoA, PMG-AFT and FARE keep the text tower frozen (`lock_text`). The paper recipes read labelled
webdataset shards (`KEY.jpg` + `KEY.cls`) through the `files` source (`paper_data`): captions and
class text embeddings from TeCoA's prompt "This is a photo of a {}" and the class names; set
`--config.data.source` to your shards (and `--config.init_from` to a converted ViT-B-32).
`,digits` runs the same method, attack and optimizer shortened on the labelled digits source
(`make demo`'s checkpoint as `init_from`, default `out/demo`):

  python experiments/train.py --config experiments/configs/adversarial.py:tecoa,digits --workdir out/tecoa
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

IMAGENET_TRAIN = 1_281_167
TINY_IMAGENET_TRAIN = 100_000

RECIPES = {
    "tecoa": dict(loss="tecoa", optimizer="sgd", beta1=0.9, batch_size=256, lr=1e-7, warmup_steps=1000,
                  weight_decay=0.0, total_steps=common.steps_for_epochs(10, IMAGENET_TRAIN, 256),
                  adv_eps=1 / 255, adv_alpha=1 / 255, adv_steps=2),
    "pmg-aft": dict(loss="pmg-aft", optimizer="sgd", beta1=0.9, batch_size=256, lr=5e-5, warmup_steps=0,
                    weight_decay=0.0, total_steps=common.steps_for_epochs(10, TINY_IMAGENET_TRAIN, 256),
                    adv_eps=1 / 255, adv_alpha=1 / 255, adv_steps=2),
    "fare": dict(loss="fare", optimizer="adamw", batch_size=128, lr=1e-5, weight_decay=1e-4, warmup_steps=1400,
                 total_steps=20_000, adv_eps=4 / 255, adv_alpha=1 / 255, adv_steps=10),
    "advflyp": dict(loss="advflyp", optimizer="adamw", batch_size=256, lr=1e-5, weight_decay=0.1, warmup_steps=1000,
                    total_steps=common.steps_for_epochs(10, IMAGENET_TRAIN, 256),
                    adv_eps=1 / 255, adv_alpha=1 / 255, adv_steps=2),
}
DIGITS_LR = {"tecoa": 1e-3, "pmg-aft": 1e-3, "fare": 1e-4, "advflyp": 1e-4}  # chosen on the digits model
TECOA_PROMPT = "This is a photo of a {}"


def paper_data(method: str) -> dict:
    """The papers' training sets as labelled `files` sources (webdataset tars: KEY.jpg + KEY.cls, or
    KEY.txt captions for AdvFLYP); point `--config.data.source` (and for TinyImageNet
    `--config.data.classnames`) at your copy."""
    from clipjax.metrics.templates import get_classnames

    if method == "advflyp":  # ImageNet images with captions (ImageNet-Captions): image-text pairs
        return {"name": "files", "source": "imagenet-captions/train-*.tar"}
    if method == "pmg-aft":  # TinyImageNet: 200 classes; its names (words of the WordNet ids) come with your copy
        return {"name": "files", "source": "tiny-imagenet/train-*.tar", "label_key": "cls",
                "classnames": "tiny-imagenet/classnames.txt", "caption_template": TECOA_PROMPT}
    # ImageNet-1k with CLIP's class names (clip_benchmark's imagenet1k list, as TeCoA's code uses)
    return {"name": "files", "source": "imagenet/train-*.tar", "label_key": "cls",
            "classnames": list(get_classnames("imagenet1k")), "caption_template": TECOA_PROMPT}


def get_config(arg=None):
    method, _, variant = (arg or "tecoa").partition(",")
    if method not in RECIPES:
        raise KeyError(f"adversarial.py:{method}: expected one of {sorted(RECIPES)}")
    recipe = dict(RECIPES[method])
    digits = variant == "digits"
    if digits:  # the same method, shortened for make demo's digits model on 2 CPU cores
        recipe.update(batch_size=64, total_steps=60, warmup_steps=5, lr=DIGITS_LR[method])
    elif variant:
        raise KeyError(f"adversarial.py:{arg}: the only variant is ',digits'")
    c = common.base_config(lock_text=method != "advflyp", schedule="cosine", log_every=10,
                           checkpoint_every=20 if digits else 1000, eval_every=30 if digits else 0, **recipe)
    c.model.name = None if digits else "ViT-B-32"  # the papers' backbone; must be init_from's architecture
    c.init_from = "out/demo" if digits else None
    c.mesh.data = -1
    c.data = {"name": "digits"} if digits else paper_data(method)
    return c
