"""pricing: slow work (a pricing engine that takes 50 to 150 ms a quote); runs as several instances."""

import asyncio
import zlib

from choreo import Service

from .messages import QuoteReady, QuoteRequested

pricing = Service("pricing")

UNIT_CENTS = {"widget": 250, "gadget": 1200, "gizmo": 4000}


def price(product: str, quantity: int) -> int:
    """Volume discount: 10 % off from 10 units, 20 % from 50."""
    discount = 0.8 if quantity >= 50 else 0.9 if quantity >= 10 else 1.0
    return round(UNIT_CENTS[product] * quantity * discount)


@pricing.on(QuoteRequested, emits=[QuoteReady])
async def quote(request: QuoteRequested, ctx) -> None:
    await asyncio.sleep(0.05 + zlib.crc32(request.request_id.encode()) % 100 / 1000)
    ctx.emit(QuoteReady(request.request_id, price(request.product, request.quantity), ctx.instance))
