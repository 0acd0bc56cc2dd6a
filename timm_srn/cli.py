"""Command-line helpers shared by the scripts, `python -m timm_srn.viz` and the benchmarks."""
import argparse

__all__ = ['ArgumentParser', 'HelpFormatter']


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and shows every option's default, except None (no default: the help
    text says what happens then) and flags' False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ''
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (`PROG: error: MESSAGE (--help lists the options)`) instead of the usage
    block, so the mistake is the one thing printed."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} (--help lists the options)\n')
