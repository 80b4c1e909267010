"""A clean little shop: the analyzer finds nothing wrong with it.

storefront takes orders from customers (outside handlers) and asks for their state; orders,
payments and shipping react to each other's events; notifications tells the customer; an admin
tool outside the system refunds payments.
"""
