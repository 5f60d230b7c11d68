"""A chat bot command, ``/imagine <prompt>``: reply "working on it", then edit in the image.

The core, :class:`ImageBot`, knows nothing of any chat framework: it talks to a
:class:`Chat` (send a reply) and the :class:`Reply` it gets back (edit it). Adapters for
discord.py and aiogram (Telegram) are below; each imports its framework inside a
function, so this file runs (and is tested) without either installed. Each user may
have ``--per-user`` images in the works at once, and a wait longer than ``--timeout``
ends with a message instead of silence.

Try it in the terminal against the fake server (messages are ``user: prompt``)::

    ACEDATACLOUD_API_TOKEN=test-token python examples/chat_bot.py \\
        --base-url http://127.0.0.1:8765 "ann: a cat" "ann: a dog" "bob: a bird"

With discord.py (``pip install discord.py``, a bot token in ``DISCORD_TOKEN``) or
aiogram 3 (``pip install aiogram``, ``TELEGRAM_TOKEN``)::

    python examples/chat_bot.py --discord
    python examples/chat_bot.py --telegram
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import sys
from collections.abc import Hashable, Sequence
from typing import Any, Protocol

from nanobanana_async import (
    NanoBananaClient,
    NanoBananaError,
    TaskFailedError,
    TaskTimeoutError,
)

logger = logging.getLogger("chat_bot")

WORKING = "Working on it..."
BUSY = "You already have {n} image(s) on the way; ask again when one is done."
TIMED_OUT = "Sorry, that is taking longer than {timeout:g} s; I gave up waiting."
FAILED = "Sorry, no image this time: {reason}"
BROKEN = "Sorry, the image service is not answering; please try again later."
USAGE = "Usage: /imagine <what to draw>"


class Reply(Protocol):
    """A message the bot sent and may edit."""

    async def edit(self, text: str, *, image_url: str | None = None) -> None: ...


class Chat(Protocol):
    """Where a command came from: the bot answers there."""

    async def reply(self, text: str) -> Reply: ...


class ImageBot:
    """The ``/imagine`` command: one shared client, a per-user limit, a timeout message."""

    def __init__(self, client: NanoBananaClient, *, per_user: int = 1, timeout: float = 180.0):
        if per_user < 1:
            raise ValueError("per_user must be at least 1")
        self.client = client
        self.per_user = per_user
        self.timeout = timeout
        self._running: collections.Counter[Hashable] = collections.Counter()

    async def imagine(self, user: Hashable, prompt: str, chat: Chat) -> None:
        """Handle one command; never raises for a service problem, the user is told."""
        prompt = prompt.strip()
        if not prompt:
            await chat.reply(USAGE)
            return
        # Checked and counted with no await in between: two commands cannot both pass.
        if self._running[user] >= self.per_user:
            await chat.reply(BUSY.format(n=self._running[user]))
            return
        self._running[user] += 1
        try:
            reply = await chat.reply(WORKING)
            await self._make(prompt, reply)
        finally:
            self._running[user] -= 1
            if not self._running[user]:
                del self._running[user]

    async def _make(self, prompt: str, reply: Reply) -> None:
        try:
            submission = await self.client.generate(prompt)
            urls = await self.client.await_completion(submission, timeout=self.timeout)
        except TaskTimeoutError:
            await reply.edit(TIMED_OUT.format(timeout=self.timeout))
        except TaskFailedError as exc:
            await reply.edit(FAILED.format(reason=exc.message))
        except (NanoBananaError, ValueError) as exc:
            logger.warning("image request failed: %s", exc)
            await reply.edit(BROKEN)
        else:
            await reply.edit(prompt, image_url=urls[0])


# --- a terminal "chat", for trying the bot without any chat service ------------------


class ConsoleReply:
    def __init__(self, number: int) -> None:
        self.number = number

    async def edit(self, text: str, *, image_url: str | None = None) -> None:
        image = f" [image: {image_url}]" if image_url else ""
        print(f"  (message {self.number} edited) {text}{image}", flush=True)


class ConsoleChat:
    sent = 0

    def __init__(self, user: str) -> None:
        self.user = user

    async def reply(self, text: str) -> ConsoleReply:
        ConsoleChat.sent += 1
        print(f"  bot -> {self.user} (message {ConsoleChat.sent}): {text}", flush=True)
        return ConsoleReply(ConsoleChat.sent)


async def run_console(bot: ImageBot, messages: Sequence[str]) -> None:
    """Deliver ``user: prompt`` messages all at once, as a busy chat would."""
    commands = []
    for message in messages:
        user, _, prompt = message.partition(":")
        print(f"{user.strip()}: /imagine {prompt.strip()}", flush=True)
        commands.append(bot.imagine(user.strip(), prompt, ConsoleChat(user.strip())))
    await asyncio.gather(*commands)


# --- discord.py -----------------------------------------------------------------------


class DiscordReply:
    def __init__(self, message: Any) -> None:
        self.message = message

    async def edit(self, text: str, *, image_url: str | None = None) -> None:
        import discord  # type: ignore[import-not-found, unused-ignore]

        embed = discord.Embed().set_image(url=image_url) if image_url else None
        await self.message.edit(content=text, embed=embed)


class DiscordChat:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    async def reply(self, text: str) -> DiscordReply:
        return DiscordReply(await self.ctx.reply(text))


async def run_discord(bot: ImageBot, token: str) -> None:
    """``!imagine <prompt>`` on Discord; discord.py runs each command in its own task."""
    import discord  # type: ignore[import-not-found, unused-ignore]
    from discord.ext import commands  # type: ignore[import-not-found, unused-ignore]

    intents = discord.Intents.default()
    intents.message_content = True
    client = commands.Bot(command_prefix="!", intents=intents)

    @client.command(name="imagine")  # type: ignore[untyped-decorator, misc, unused-ignore]
    async def imagine(ctx: Any, *, prompt: str = "") -> None:
        await bot.imagine(ctx.author.id, prompt, DiscordChat(ctx))

    async with client:
        await client.start(token)


# --- aiogram 3 (Telegram) -------------------------------------------------------------


class TelegramReply:
    def __init__(self, message: Any) -> None:
        self.message = message

    async def edit(self, text: str, *, image_url: str | None = None) -> None:
        # A text message cannot become a photo; Telegram previews the link instead.
        await self.message.edit_text(f"{text}\n{image_url}" if image_url else text)


class TelegramChat:
    def __init__(self, message: Any) -> None:
        self.message = message

    async def reply(self, text: str) -> TelegramReply:
        return TelegramReply(await self.message.answer(text))


async def run_telegram(bot: ImageBot, token: str) -> None:
    """``/imagine <prompt>`` on Telegram; aiogram handles each update in its own task."""
    from aiogram import Bot, Dispatcher  # type: ignore[import-not-found, unused-ignore]
    from aiogram.filters import Command  # type: ignore[import-not-found, unused-ignore]

    dispatcher = Dispatcher()

    @dispatcher.message(Command("imagine"))  # type: ignore[untyped-decorator, misc, unused-ignore]
    async def imagine(message: Any, command: Any) -> None:
        await bot.imagine(message.from_user.id, command.args or "", TelegramChat(message))

    telegram = Bot(token)
    try:
        await dispatcher.start_polling(telegram)
    finally:
        await telegram.session.close()


# --- entry point ----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="An /imagine chat bot on Nano Banana.")
    parser.add_argument("messages", nargs="*", help='terminal mode: "user: prompt" messages')
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--discord", action="store_true", help="token in DISCORD_TOKEN")
    where.add_argument("--telegram", action="store_true", help="token in TELEGRAM_TOKEN")
    parser.add_argument("--per-user", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--base-url", default=os.environ.get("ACEDATACLOUD_API_BASE_URL"))
    parser.add_argument(
        "--token",
        default=os.environ.get("ACEDATACLOUD_API_TOKEN"),
        help="API token (better: the ACEDATACLOUD_API_TOKEN environment variable)",
    )
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("pass --token or set ACEDATACLOUD_API_TOKEN")
    return args


async def amain(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    # One client for the whole bot, created inside the loop the framework runs in.
    async with NanoBananaClient(args.token, base_url=args.base_url) as client:
        bot = ImageBot(client, per_user=args.per_user, timeout=args.timeout)
        if args.discord:
            await run_discord(bot, os.environ["DISCORD_TOKEN"])
        elif args.telegram:
            await run_telegram(bot, os.environ["TELEGRAM_TOKEN"])
        else:
            await run_console(bot, args.messages or ["you: a banana wearing sunglasses"])
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(amain()))
