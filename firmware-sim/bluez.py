"""A simulated BlueZ: python-dbusmock's ``bluez5`` template on a private system bus, and a radio
that puts advertisements into it, so bleak's real BlueZ backend scans simulated firmware.

:class:`MockBlueZ` starts a private ``dbus-daemon`` (never the machine's bus), points
``DBUS_SYSTEM_BUS_ADDRESS`` at it for this process (restored on exit), spawns the template and adds
an adapter. :class:`BlueZRadio` turns each advertisement into what bluetoothd does: a new
``org.bluez.Device1`` object (``InterfacesAdded``) the first time an address is heard, then property
changes. The template's own ``AddDevice`` declares ``ManufacturerData`` as an array, which bleak
cannot read, so devices are added with ``AddObject`` and the D-Bus types BlueZ uses.

Needs ``python-dbusmock`` (a test dependency) and the ``dbus-daemon`` binary.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

__all__ = ["BlueZRadio", "MockBlueZ"]

_MOCK = "org.freedesktop.DBus.Mock"
_BLUEZ_MOCK = "org.bluez.Mock"
_DEVICE = "org.bluez.Device1"
_OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
_ADDRESS_ENV = "DBUS_SYSTEM_BUS_ADDRESS"


def _reap(process: subprocess.Popen[Any] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class MockBlueZ:
    """``with MockBlueZ() as bluez:``; ``passive=False`` leaves out the advertisement-monitor API
    (as BlueZ without ``--experimental``), so passive scanning is refused."""

    def __init__(self, *, adapter: str = "hci0", passive: bool = True) -> None:
        self.adapter = adapter
        self.adapter_path = f"/org/bluez/{adapter}"
        self._passive = passive
        self._bus: Any = None
        self._mock: Any = None
        self._conn: Any = None
        self._saved_env: str | None = None
        self.radio = BlueZRadio(self)

    @property
    def address(self) -> str:
        """The private bus, as ``DBUS_SYSTEM_BUS_ADDRESS`` takes it."""
        return str(self._bus.address)

    def __enter__(self) -> Self:
        from dbusmock.testcase import BusType, PrivateDBus, SpawnedMock

        self._saved_env = os.environ.get(_ADDRESS_ENV)
        self._bus = PrivateDBus(BusType.SYSTEM)
        try:
            self._bus.start()  # sets DBUS_SYSTEM_BUS_ADDRESS for this process
            self._mock = SpawnedMock.spawn_with_template(
                "bluez5", {"enable_monitor_api": self._passive}, bustype=BusType.SYSTEM,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # an unread pipe would block the mock
            )
            self._conn = BusType.SYSTEM.get_connection()
            self._mock.obj.AddAdapter(self.adapter, "iotgw-sim", dbus_interface=_BLUEZ_MOCK)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        # dbusmock waits only 1 s after SIGTERM and then kills without reaping: on a loaded machine that
        # leaves a running process behind its Popen. Reap both ourselves first, then let dbusmock tidy up.
        if self._mock is not None:
            _reap(self._mock.process)
            self._mock.terminate()
            self._mock = None
        if self._bus is not None:
            _reap(getattr(self._bus, "_daemon", None))
            self._bus.stop()
            self._bus = None
        if self._saved_env is None:
            os.environ.pop(_ADDRESS_ENV, None)
        else:
            os.environ[_ADDRESS_ENV] = self._saved_env

    def _object(self, path: str) -> Any:
        return self._conn.get_object("org.bluez", path)

    @property
    def root(self) -> Any:
        return self._mock.obj


class BlueZRadio:
    """Advertisements into a :class:`MockBlueZ`; the same ``push`` as the in-process
    ``drivers.ble.sources.SimulatedRadio``. Blocking D-Bus calls of a few milliseconds each."""

    def __init__(self, bluez: MockBlueZ) -> None:
        self._bluez = bluez
        self._devices: dict[str, Any] = {}
        self.pushed = 0

    def _path(self, address: str) -> str:
        return f"{self._bluez.adapter_path}/dev_{address.upper().replace(':', '_')}"

    def push(
        self, address: str, rssi: int, service_data: Mapping[str, bytes], name: str | None = None,
        manufacturer_data: Mapping[int, bytes] | None = None,
    ) -> None:
        import dbus

        props: dict[str, Any] = {
            "RSSI": dbus.Int16(rssi),
            "ServiceData": dbus.Dictionary(
                {uuid: dbus.Array(bytes(data), signature="y") for uuid, data in service_data.items()}, signature="sv"
            ),
            "ManufacturerData": dbus.Dictionary(
                {dbus.UInt16(cid): dbus.Array(bytes(data), signature="y")
                 for cid, data in (manufacturer_data or {}).items()},
                signature="qv",
            ),
        }
        address = address.upper()
        device = self._devices.get(address)
        path = self._path(address)
        if device is None:
            props |= {
                "Address": dbus.String(address),
                "AddressType": dbus.String("public"),
                "Alias": dbus.String(name or address.replace(":", "-")),
                "Adapter": dbus.ObjectPath(self._bluez.adapter_path),
                "Paired": dbus.Boolean(False),
                "Connected": dbus.Boolean(False),
                "Trusted": dbus.Boolean(False),
                "Blocked": dbus.Boolean(False),
                "ServicesResolved": dbus.Boolean(False),
                "UUIDs": dbus.Array([], signature="s"),
            }
            if name is not None:
                props["Name"] = dbus.String(name)
            root = self._bluez.root
            root.AddObject(path, _DEVICE, props, [], dbus_interface=_MOCK)
            root.EmitSignal(
                _OBJECT_MANAGER, "InterfacesAdded", "oa{sa{sv}}",
                [dbus.ObjectPath(path), dbus.Dictionary({_DEVICE: dbus.Dictionary(props, signature="sv")},
                                                        signature="sa{sv}")],
                dbus_interface=_MOCK,
            )
            self._devices[address] = self._bluez._object(path)
        else:
            device.UpdateProperties(_DEVICE, props, dbus_interface=_MOCK)
        self.pushed += 1


_SERVICE = "org.bluez.GattService1"
_CHARACTERISTIC = "org.bluez.GattCharacteristic1"


class GattPeripheral:
    """A connectable device in a :class:`MockBlueZ` with one GATT service holding one
    characteristic (readable, notifying), as bluetoothd presents it after service discovery:
    ``Device1.Connect`` sets ``Connected`` and ``ServicesResolved``; ``ReadValue`` returns the
    characteristic's ``Value``; ``StartNotify``/``StopNotify`` switch ``Notifying``; a new value
    with notifications on is a ``PropertiesChanged`` of ``Value`` (what bleak listens to)."""

    def __init__(self, bluez: MockBlueZ, address: str, service_uuid: str, characteristic_uuid: str) -> None:
        self._bluez = bluez
        self.address = address.upper()
        self.service_uuid = service_uuid
        self.characteristic_uuid = characteristic_uuid
        self.device_path = bluez.radio._path(self.address)
        self.service_path = f"{self.device_path}/service000c"
        self.characteristic_path = f"{self.service_path}/char000d"
        self._device: Any = None
        self._characteristic: Any = None

    def install(self, value: bytes) -> None:
        """Adds the device (by advertising it once) and its GATT objects."""
        import dbus

        self._bluez.radio.push(self.address, -60, {}, "iotgw-gatt-sim")
        self._device = self._bluez._object(self.device_path)
        device_methods = [
            ("Connect", "", "", "self.UpdateProperties('org.bluez.Device1', "
             "{'Connected': dbus.Boolean(True), 'ServicesResolved': dbus.Boolean(True)})"),
            ("Disconnect", "", "", "self.UpdateProperties('org.bluez.Device1', "
             "{'Connected': dbus.Boolean(False), 'ServicesResolved': dbus.Boolean(False)})"),
        ]
        self._device.AddMethods(_DEVICE, device_methods, dbus_interface=_MOCK)
        service_props = {
            "UUID": dbus.String(self.service_uuid), "Device": dbus.ObjectPath(self.device_path),
            "Primary": dbus.Boolean(True), "Includes": dbus.Array([], signature="o"),
        }
        char_props = {
            "UUID": dbus.String(self.characteristic_uuid), "Service": dbus.ObjectPath(self.service_path),
            "Value": dbus.Array(value, signature="y"), "Notifying": dbus.Boolean(False),
            "Flags": dbus.Array(["read", "notify"], signature="s"), "MTU": dbus.UInt16(23),
        }
        char_methods = [
            ("ReadValue", "a{sv}", "ay", f"ret = self.props['{_CHARACTERISTIC}']['Value']"),
            ("StartNotify", "", "", f"self.UpdateProperties('{_CHARACTERISTIC}', {{'Notifying': dbus.Boolean(True)}})"),
            ("StopNotify", "", "", f"self.UpdateProperties('{_CHARACTERISTIC}', {{'Notifying': dbus.Boolean(False)}})"),
        ]
        root = self._bluez.root
        for path, iface, props, methods in ((self.service_path, _SERVICE, service_props, []),
                                            (self.characteristic_path, _CHARACTERISTIC, char_props, char_methods)):
            root.AddObject(path, iface, props, methods, dbus_interface=_MOCK)
            root.EmitSignal(
                _OBJECT_MANAGER, "InterfacesAdded", "oa{sa{sv}}",
                [dbus.ObjectPath(path), dbus.Dictionary({iface: dbus.Dictionary(props, signature="sv")},
                                                        signature="sa{sv}")],
                dbus_interface=_MOCK,
            )
        self._characteristic = self._bluez._object(self.characteristic_path)

    def set_value(self, value: bytes) -> None:
        """The sensor measured: a read returns ``value``; a subscriber is notified."""
        import dbus

        self._characteristic.UpdateProperties(_CHARACTERISTIC, {"Value": dbus.Array(value, signature="y")},
                                              dbus_interface=_MOCK)

    def drop_connection(self) -> None:
        """The link is lost (out of range, power cycle), as bluetoothd reports it."""
        import dbus

        self._device.UpdateProperties(
            _DEVICE, {"Connected": dbus.Boolean(False), "ServicesResolved": dbus.Boolean(False)},
            dbus_interface=_MOCK,
        )

    def advertise(self) -> None:
        self._bluez.radio.push(self.address, -60, {}, "iotgw-gatt-sim")

    @property
    def connected(self) -> bool:
        return bool(self._device.Get(_DEVICE, "Connected", dbus_interface="org.freedesktop.DBus.Properties"))
