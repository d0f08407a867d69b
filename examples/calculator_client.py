"""Call the Calculator: `python examples/calculator_client.py` (start the server first)."""

from __future__ import annotations

import sys

from calculator import ADDRESS, Calculator

import rapace


async def main(address: str) -> None:
    async with rapace.connect(address) as session:
        calc = rapace.client(Calculator, session, timeout=5.0)
        print("2 + 3 =", await calc.add(2, 3))
        print("7 / 2 =", await calc.divide(7, 2))
        try:
            await calc.divide(1, 0)
        except rapace.InvalidArgument as exc:
            print(f"1 / 0 -> {type(exc).__name__}: {exc}")
        print("countdown:", end=" ", flush=True)
        async for n in calc.countdown(5):
            print(n, end=" ", flush=True)
        print()


if __name__ == "__main__":
    rapace.run(main(sys.argv[1] if len(sys.argv) > 1 else ADDRESS))
