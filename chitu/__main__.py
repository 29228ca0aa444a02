"""`python -m chitu serve.port=21002 models=<name> …` starts the OpenAI-compatible service."""

if __name__ == "__main__":
    # Imported here: the engine process re-imports this module (multiprocessing's spawn) and needs none of the server.
    from chitu.serve.server import main

    main()
