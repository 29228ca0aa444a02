"""`python -m chitu serve.port=21002 models=<name> …` starts the OpenAI-compatible service."""
from chitu.serve.server import main

if __name__ == "__main__":
    main()
