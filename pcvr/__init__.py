"""pcvr: privacy-preserving conversion-rate modelling across an ad platform and
advertiser-side data clean rooms, coordinated by Flower.

Sub-packages are the parties (``advertiser``, ``clean_room``, ``platform``) plus
what they share (``protocols``, ``models``, ``data``). A party never imports
another party.
"""

__version__ = "0.1.0"
