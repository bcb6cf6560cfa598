"""Source of the ``trust_remote_code`` model that ``--from megaponder --to hf`` exports.

The two modules here import only torch and transformers (never megaponder): the exporter
copies them next to the weights, and the hub loads them from there. Keeping them as real
files of the package means they are linted and tested like the rest of the code.
"""
