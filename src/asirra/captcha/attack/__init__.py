"""What a bot runs against a live service: the HTTP bot (`bot`) and the counter-moves it applies to
served images before classifying them (`counter`).

Light on purpose (httpx, Pillow, numpy; no scikit-learn, no matplotlib): may import the CAPTCHA's
rules, the core's inference and the defend layer's published methods; never the service or the
experiments, and never the training code.
"""
