"""The bookshop domain's tools: a small retail-like domain in tau2-bench's format, ours, for tests and the quickstart.

Its data sits next to this module (``db.json``, ``policy.md``, ``tasks.json``, ``split_tasks.json``; point
``environment.domain_dir`` at ``builtin:bookshop``). Customers, orders of books, six tools: two lookups
(``find_user``, ``get_order``), three writes (``cancel_order``, ``change_address``, ``return_order``) and a
transfer. Every task's reference trajectory starts by authenticating the customer (``find_user``), as
tau2's airline and retail tasks start with ``get_user_details`` / ``find_user_id_by_email``.

The DB is the plain JSON (``{"users": {...}, "orders": {...}}``); the tools read and change ``self.db`` and
raise ``ValueError`` for a request the data does not allow, which the agent sees as ``Error: <message>``.
"""

from __future__ import annotations

from typing import Any, Literal

from trainer.envs.toolkit import tool

CancelReason = Literal["no longer needed", "ordered by mistake"]


class BookshopTools:
    """All tools of the bookshop domain."""

    def __init__(self, db: dict[str, Any]):
        self.db = db

    def _order(self, order_id: str) -> dict[str, Any]:
        order = self.db["orders"].get(order_id.strip().upper())
        if order is None:
            raise ValueError(f"Order {order_id} not found")
        return order

    def _pending(self, order_id: str, action: str) -> dict[str, Any]:
        order = self._order(order_id)
        if order["status"] != "pending":
            raise ValueError(
                f"Order {order['order_id']} is {order['status']}: only pending orders can be {action}"
            )
        return order

    @tool("read")
    def find_user(self, email: str) -> dict[str, Any]:
        """Find a customer by email address.

        Args:
            email: The customer's email address, such as 'ada.park@example.com'.

        Returns:
            The customer's user id, name, email and order ids.
        """
        wanted = email.strip().lower()
        for user in self.db["users"].values():
            if user["email"] == wanted:
                return user
        raise ValueError(f"No customer with email {email}")

    @tool("read")
    def get_order(self, order_id: str) -> dict[str, Any]:
        """Get the details of an order: status, items, total, delivery address, refund.

        Args:
            order_id: The order id, such as 'B1001'.
        """
        return self._order(order_id)

    @tool("write")
    def cancel_order(self, order_id: str, reason: CancelReason) -> dict[str, Any]:
        """Cancel a pending order; its total is refunded.

        Args:
            order_id: The order id, such as 'B1001'.
            reason: Why the customer cancels: 'no longer needed' or 'ordered by mistake'.
        """
        order = self._pending(order_id, "cancelled")
        order.update(status="cancelled", refund=order["total"], cancel_reason=reason)
        return order

    @tool("write")
    def change_address(self, order_id: str, address: str) -> dict[str, Any]:
        """Change the delivery address of a pending order.

        Args:
            order_id: The order id, such as 'B1001'.
            address: The new delivery address, such as '9 Quay Street, Portsmouth'.
        """
        order = self._pending(order_id, "changed")
        order["address"] = address.strip()
        return order

    @tool("write")
    def return_order(self, order_id: str) -> dict[str, Any]:
        """Start the return of a delivered order; its total is refunded once the books arrive.

        Args:
            order_id: The order id, such as 'B1002'.
        """
        order = self._order(order_id)
        if order["status"] != "delivered":
            raise ValueError(
                f"Order {order['order_id']} is {order['status']}: only delivered orders can be returned"
            )
        order["status"] = "return requested"
        return order

    @tool("generic", mutates=False)
    def transfer_to_human(self, summary: str) -> str:
        """Transfer the customer to a human agent, with a summary of their request.

        Args:
            summary: A short summary of what the customer needs.
        """
        return "Transfer successful"
