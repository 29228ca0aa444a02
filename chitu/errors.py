"""The base of errors caused by what the user asked for (config, paths, models), as opposed to bugs:
entry points report these as one clear line instead of a traceback."""


class UserError(Exception):
    pass
