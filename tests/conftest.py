import os
import sys

# tests import the project's top-level modules (model, train, prepare, ...) and run its scripts
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach the Hub
