"""SSUL (unknown class from saliency maps, per-step heads, frozen network after step 0) and
SSUL-M (with an exemplar memory): the method's numerical pieces (docs/behaviour.md, SSUL).

* ``labels``: per-step class counts and channels, the training target with the unknown
  class, pseudo-labels from the old model, the prediction that merges unknown into
  background, the step's image list;
* ``loss``: BCE over the valid pixels (and SSUL's CE / focal variants);
* ``optim``: parameter groups with SSUL's learning rates, ``poly`` with its floor and
  ``warm_poly``;
* ``memory``: candidates, the class-balanced round-robin selection (reusable with other
  candidate layouts and class lists), the memory file's update, the batch mix;
* ``evaluation``: SSUL's scores (absent classes count 0), the before/after report, the
  current-class validation score.

The network is ``modules.tv_deeplab``. Quirks S1-S28 are reproduced by default; keyword
switches turn the fixes on.
"""
