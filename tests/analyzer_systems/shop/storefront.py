"""The web shop: it sends PlaceOrder and asks GetOrder from its HTTP endpoints, outside handlers."""

from choreo import Service

from .messages import GetOrder, PlaceOrder

storefront = Service("storefront", sends=[PlaceOrder, GetOrder])
