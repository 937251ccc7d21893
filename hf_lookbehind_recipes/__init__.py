"""What the recipes of ``examples/`` and the scripts of ``scripts/`` share, installed with the
package (``pip install -e ".[examples]"``) so that each imports it by name: the image data
arguments and splits, the CIFAR recipe with its data, models and label noise, the classifier
wrapper the Trainer trains, the learning-rate schedules, the evaluation metrics and the checks
of the evaluation flags, the logging set-up, the train/save/log routine, the table printer, the
recipes' check for the Hugging Face Hub (``offline``: without it, one message with the flags for
local data and the tiny offline command) and the tiny data sets of those commands
(``tiny_data``, ``python -m hf_lookbehind_recipes.tiny_data RECIPE DIR``).

The modules import the libraries of the ``examples`` extra (``datasets``, ``timm``,
``torchvision``, ``scikit-learn``, ``transformers``); ``hf_lookbehind`` itself never imports them.
"""
