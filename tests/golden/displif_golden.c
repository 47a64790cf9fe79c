/*
 * Golden vectors for displback, taken from Xen's own displif.h/ring.h (Debian libxen-dev).
 *
 * Compiled and run at test time by tests/golden/__init__.py. Prints one JSON object with:
 *   structs   - sizeof and offsetof/sizeof of every member of every displif struct, the
 *               DEFINE_RING_TYPES sring and its entry union;
 *   packets   - absolute [offset, size] of every named field of each 64-byte packet kind;
 *   ring      - __RING_SIZE for one page and the entry size;
 *   constants - every XENDISPL_* object-like macro (ints and strings);
 *   errno     - XEN_E* values for the errno numbers displback sends;
 *   samples   - requests/responses/events filled in C, with their fields read back from the
 *               C structs and hex dumps (dirty variants have non-zero reserved bytes).
 * Written for this project; nothing is copied from Xen, Linux or displ_be.
 */
#include <inttypes.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <xen/errno.h>
#include <xen/io/displif.h>

#define PAGE_BYTES 4096

/* ---- a tiny JSON emitter ---------------------------------------------------------------- */

static int first[32];
static int depth;

static void sep(void)
{
    if (!first[depth])
        putchar(',');
    first[depth] = 0;
}

static void key(const char *k)
{
    sep();
    printf("\"%s\":", k);
}

static void open_obj(const char *k)
{
    if (k)
        key(k);
    else
        sep();
    putchar('{');
    first[++depth] = 1;
}

static void close_obj(void)
{
    putchar('}');
    depth--;
}

static void open_arr(const char *k)
{
    key(k);
    putchar('[');
    first[++depth] = 1;
}

static void close_arr(void)
{
    putchar(']');
    depth--;
}

static void unum(const char *k, unsigned long long v)
{
    key(k);
    printf("%llu", v);
}

static void snum(const char *k, long long v)
{
    key(k);
    printf("%lld", v);
}

static void boolean(const char *k, int v)
{
    key(k);
    fputs(v ? "true" : "false", stdout);
}

static void str(const char *k, const char *v)
{
    key(k);
    putchar('"');
    for (; *v; v++) {
        if (*v == '"' || *v == '\\')
            putchar('\\');
        putchar(*v);
    }
    putchar('"');
}

static void span(const char *k, size_t offset, size_t size)
{
    key(k);
    printf("[%zu,%zu]", offset, size);
}

static void hex(const char *k, const void *p, size_t n)
{
    const unsigned char *b = p;
    size_t i;

    key(k);
    putchar('"');
    for (i = 0; i < n; i++)
        printf("%02x", b[i]);
    putchar('"');
}

#define SIZEOF_MEMBER(S, path) sizeof(((S *)0)->path)
/* A member of struct/union S: name is the member path as written. */
#define MEMBER(S, path) span(#path, offsetof(S, path), SIZEOF_MEMBER(S, path))
/* A packet field under its protocol name, absolute from the start of the packet. */
#define FIELD(name, S, path) span(name, offsetof(S, path), SIZEOF_MEMBER(S, path))

/* ---- layouts ---------------------------------------------------------------------------- */

static void structs(void)
{
    open_obj("structs");

    open_obj("xendispl_req");
    unum("size", sizeof(struct xendispl_req));
    open_obj("fields");
    MEMBER(struct xendispl_req, id);
    MEMBER(struct xendispl_req, operation);
    MEMBER(struct xendispl_req, reserved);
    MEMBER(struct xendispl_req, op);
    MEMBER(struct xendispl_req, op.dbuf_create);
    MEMBER(struct xendispl_req, op.dbuf_destroy);
    MEMBER(struct xendispl_req, op.fb_attach);
    MEMBER(struct xendispl_req, op.fb_detach);
    MEMBER(struct xendispl_req, op.set_config);
    MEMBER(struct xendispl_req, op.pg_flip);
    MEMBER(struct xendispl_req, op.get_edid);
    MEMBER(struct xendispl_req, op.reserved);
    close_obj();
    close_obj();

    open_obj("xendispl_dbuf_create_req");
    unum("size", sizeof(struct xendispl_dbuf_create_req));
    open_obj("fields");
    MEMBER(struct xendispl_dbuf_create_req, dbuf_cookie);
    MEMBER(struct xendispl_dbuf_create_req, width);
    MEMBER(struct xendispl_dbuf_create_req, height);
    MEMBER(struct xendispl_dbuf_create_req, bpp);
    MEMBER(struct xendispl_dbuf_create_req, buffer_sz);
    MEMBER(struct xendispl_dbuf_create_req, flags);
    MEMBER(struct xendispl_dbuf_create_req, gref_directory);
    MEMBER(struct xendispl_dbuf_create_req, data_ofs);
    close_obj();
    close_obj();

    open_obj("xendispl_dbuf_destroy_req");
    unum("size", sizeof(struct xendispl_dbuf_destroy_req));
    open_obj("fields");
    MEMBER(struct xendispl_dbuf_destroy_req, dbuf_cookie);
    close_obj();
    close_obj();

    open_obj("xendispl_fb_attach_req");
    unum("size", sizeof(struct xendispl_fb_attach_req));
    open_obj("fields");
    MEMBER(struct xendispl_fb_attach_req, dbuf_cookie);
    MEMBER(struct xendispl_fb_attach_req, fb_cookie);
    MEMBER(struct xendispl_fb_attach_req, width);
    MEMBER(struct xendispl_fb_attach_req, height);
    MEMBER(struct xendispl_fb_attach_req, pixel_format);
    close_obj();
    close_obj();

    open_obj("xendispl_fb_detach_req");
    unum("size", sizeof(struct xendispl_fb_detach_req));
    open_obj("fields");
    MEMBER(struct xendispl_fb_detach_req, fb_cookie);
    close_obj();
    close_obj();

    open_obj("xendispl_set_config_req");
    unum("size", sizeof(struct xendispl_set_config_req));
    open_obj("fields");
    MEMBER(struct xendispl_set_config_req, fb_cookie);
    MEMBER(struct xendispl_set_config_req, x);
    MEMBER(struct xendispl_set_config_req, y);
    MEMBER(struct xendispl_set_config_req, width);
    MEMBER(struct xendispl_set_config_req, height);
    MEMBER(struct xendispl_set_config_req, bpp);
    close_obj();
    close_obj();

    open_obj("xendispl_page_flip_req");
    unum("size", sizeof(struct xendispl_page_flip_req));
    open_obj("fields");
    MEMBER(struct xendispl_page_flip_req, fb_cookie);
    close_obj();
    close_obj();

    open_obj("xendispl_get_edid_req");
    unum("size", sizeof(struct xendispl_get_edid_req));
    open_obj("fields");
    MEMBER(struct xendispl_get_edid_req, buffer_sz);
    MEMBER(struct xendispl_get_edid_req, gref_directory);
    close_obj();
    close_obj();

    open_obj("xendispl_resp");
    unum("size", sizeof(struct xendispl_resp));
    open_obj("fields");
    MEMBER(struct xendispl_resp, id);
    MEMBER(struct xendispl_resp, operation);
    MEMBER(struct xendispl_resp, reserved);
    MEMBER(struct xendispl_resp, status);
    MEMBER(struct xendispl_resp, op);
    MEMBER(struct xendispl_resp, op.get_edid);
    MEMBER(struct xendispl_resp, op.reserved1);
    close_obj();
    close_obj();

    open_obj("xendispl_get_edid_resp");
    unum("size", sizeof(struct xendispl_get_edid_resp));
    open_obj("fields");
    MEMBER(struct xendispl_get_edid_resp, edid_sz);
    close_obj();
    close_obj();

    open_obj("xendispl_evt");
    unum("size", sizeof(struct xendispl_evt));
    open_obj("fields");
    MEMBER(struct xendispl_evt, id);
    MEMBER(struct xendispl_evt, type);
    MEMBER(struct xendispl_evt, reserved);
    MEMBER(struct xendispl_evt, op);
    MEMBER(struct xendispl_evt, op.pg_flip);
    MEMBER(struct xendispl_evt, op.reserved);
    close_obj();
    close_obj();

    open_obj("xendispl_pg_flip_evt");
    unum("size", sizeof(struct xendispl_pg_flip_evt));
    open_obj("fields");
    MEMBER(struct xendispl_pg_flip_evt, fb_cookie);
    close_obj();
    close_obj();

    open_obj("xendispl_event_page");
    unum("size", sizeof(struct xendispl_event_page));
    open_obj("fields");
    MEMBER(struct xendispl_event_page, in_cons);
    MEMBER(struct xendispl_event_page, in_prod);
    MEMBER(struct xendispl_event_page, reserved);
    close_obj();
    close_obj();

    open_obj("xendispl_page_directory");
    unum("size", sizeof(struct xendispl_page_directory));
    open_obj("fields");
    MEMBER(struct xendispl_page_directory, gref_dir_next_page);
    MEMBER(struct xendispl_page_directory, gref);
    MEMBER(struct xendispl_page_directory, gref[0]);
    close_obj();
    close_obj();

    open_obj("xen_displif_sring");
    unum("size", sizeof(struct xen_displif_sring));
    open_obj("fields");
    MEMBER(struct xen_displif_sring, req_prod);
    MEMBER(struct xen_displif_sring, req_event);
    MEMBER(struct xen_displif_sring, rsp_prod);
    MEMBER(struct xen_displif_sring, rsp_event);
    MEMBER(struct xen_displif_sring, pvt);
    MEMBER(struct xen_displif_sring, __pad);
    MEMBER(struct xen_displif_sring, ring);
    MEMBER(struct xen_displif_sring, ring[0]);
    MEMBER(struct xen_displif_sring, ring[1]);
    close_obj();
    close_obj();

    open_obj("xen_displif_sring_entry");
    unum("size", sizeof(union xen_displif_sring_entry));
    open_obj("fields");
    MEMBER(union xen_displif_sring_entry, req);
    MEMBER(union xen_displif_sring_entry, rsp);
    close_obj();
    close_obj();

    close_obj();
}

static void packets(void)
{
    open_obj("packets");

#define REQ_HEADER()                                          \
    unum("size", sizeof(struct xendispl_req));                \
    open_obj("fields");                                       \
    FIELD("id", struct xendispl_req, id);                     \
    FIELD("operation", struct xendispl_req, operation)

    open_obj("DBUF_CREATE");
    REQ_HEADER();
    FIELD("dbuf_cookie", struct xendispl_req, op.dbuf_create.dbuf_cookie);
    FIELD("width", struct xendispl_req, op.dbuf_create.width);
    FIELD("height", struct xendispl_req, op.dbuf_create.height);
    FIELD("bpp", struct xendispl_req, op.dbuf_create.bpp);
    FIELD("buffer_sz", struct xendispl_req, op.dbuf_create.buffer_sz);
    FIELD("flags", struct xendispl_req, op.dbuf_create.flags);
    FIELD("gref_directory", struct xendispl_req, op.dbuf_create.gref_directory);
    FIELD("data_ofs", struct xendispl_req, op.dbuf_create.data_ofs);
    close_obj();
    close_obj();

    open_obj("DBUF_DESTROY");
    REQ_HEADER();
    FIELD("dbuf_cookie", struct xendispl_req, op.dbuf_destroy.dbuf_cookie);
    close_obj();
    close_obj();

    open_obj("FB_ATTACH");
    REQ_HEADER();
    FIELD("dbuf_cookie", struct xendispl_req, op.fb_attach.dbuf_cookie);
    FIELD("fb_cookie", struct xendispl_req, op.fb_attach.fb_cookie);
    FIELD("width", struct xendispl_req, op.fb_attach.width);
    FIELD("height", struct xendispl_req, op.fb_attach.height);
    FIELD("pixel_format", struct xendispl_req, op.fb_attach.pixel_format);
    close_obj();
    close_obj();

    open_obj("FB_DETACH");
    REQ_HEADER();
    FIELD("fb_cookie", struct xendispl_req, op.fb_detach.fb_cookie);
    close_obj();
    close_obj();

    open_obj("SET_CONFIG");
    REQ_HEADER();
    FIELD("fb_cookie", struct xendispl_req, op.set_config.fb_cookie);
    FIELD("x", struct xendispl_req, op.set_config.x);
    FIELD("y", struct xendispl_req, op.set_config.y);
    FIELD("width", struct xendispl_req, op.set_config.width);
    FIELD("height", struct xendispl_req, op.set_config.height);
    FIELD("bpp", struct xendispl_req, op.set_config.bpp);
    close_obj();
    close_obj();

    open_obj("PG_FLIP");
    REQ_HEADER();
    FIELD("fb_cookie", struct xendispl_req, op.pg_flip.fb_cookie);
    close_obj();
    close_obj();

    open_obj("GET_EDID");
    REQ_HEADER();
    FIELD("buffer_sz", struct xendispl_req, op.get_edid.buffer_sz);
    FIELD("gref_directory", struct xendispl_req, op.get_edid.gref_directory);
    close_obj();
    close_obj();

    open_obj("RESPONSE");
    unum("size", sizeof(struct xendispl_resp));
    open_obj("fields");
    FIELD("id", struct xendispl_resp, id);
    FIELD("operation", struct xendispl_resp, operation);
    FIELD("status", struct xendispl_resp, status);
    FIELD("edid_sz", struct xendispl_resp, op.get_edid.edid_sz);
    close_obj();
    close_obj();

    open_obj("EVT_PG_FLIP");
    unum("size", sizeof(struct xendispl_evt));
    open_obj("fields");
    FIELD("id", struct xendispl_evt, id);
    FIELD("type", struct xendispl_evt, type);
    FIELD("fb_cookie", struct xendispl_evt, op.pg_flip.fb_cookie);
    close_obj();
    close_obj();

    close_obj();
}

static void ring(void)
{
    open_obj("ring");
    unum("ring_size_one_page", __RING_SIZE((struct xen_displif_sring *)0, PAGE_BYTES));
    unum("entry_size", sizeof(union xen_displif_sring_entry));
    unum("header_size", offsetof(struct xen_displif_sring, ring));
    unum("grefs_per_dir_page",
         (PAGE_BYTES - offsetof(struct xendispl_page_directory, gref)) /
             SIZEOF_MEMBER(struct xendispl_page_directory, gref[0]));
    close_obj();
}

static void constants(void)
{
    open_obj("constants");
    str("XENDISPL_PROTOCOL_VERSION", XENDISPL_PROTOCOL_VERSION);
    snum("XENDISPL_PROTOCOL_VERSION_INT", XENDISPL_PROTOCOL_VERSION_INT);
    snum("XENDISPL_OP_DBUF_CREATE", XENDISPL_OP_DBUF_CREATE);
    snum("XENDISPL_OP_DBUF_DESTROY", XENDISPL_OP_DBUF_DESTROY);
    snum("XENDISPL_OP_FB_ATTACH", XENDISPL_OP_FB_ATTACH);
    snum("XENDISPL_OP_FB_DETACH", XENDISPL_OP_FB_DETACH);
    snum("XENDISPL_OP_SET_CONFIG", XENDISPL_OP_SET_CONFIG);
    snum("XENDISPL_OP_PG_FLIP", XENDISPL_OP_PG_FLIP);
    snum("XENDISPL_OP_GET_EDID", XENDISPL_OP_GET_EDID);
    snum("XENDISPL_EVT_PG_FLIP", XENDISPL_EVT_PG_FLIP);
    str("XENDISPL_DRIVER_NAME", XENDISPL_DRIVER_NAME);
    str("XENDISPL_LIST_SEPARATOR", XENDISPL_LIST_SEPARATOR);
    str("XENDISPL_RESOLUTION_SEPARATOR", XENDISPL_RESOLUTION_SEPARATOR);
    str("XENDISPL_FIELD_BE_VERSIONS", XENDISPL_FIELD_BE_VERSIONS);
    str("XENDISPL_FIELD_FE_VERSION", XENDISPL_FIELD_FE_VERSION);
    str("XENDISPL_FIELD_REQ_RING_REF", XENDISPL_FIELD_REQ_RING_REF);
    str("XENDISPL_FIELD_REQ_CHANNEL", XENDISPL_FIELD_REQ_CHANNEL);
    str("XENDISPL_FIELD_EVT_RING_REF", XENDISPL_FIELD_EVT_RING_REF);
    str("XENDISPL_FIELD_EVT_CHANNEL", XENDISPL_FIELD_EVT_CHANNEL);
    str("XENDISPL_FIELD_RESOLUTION", XENDISPL_FIELD_RESOLUTION);
    str("XENDISPL_FIELD_BE_ALLOC", XENDISPL_FIELD_BE_ALLOC);
    str("XENDISPL_FIELD_UNIQUE_ID", XENDISPL_FIELD_UNIQUE_ID);
    snum("XENDISPL_EDID_BLOCK_SIZE", XENDISPL_EDID_BLOCK_SIZE);
    snum("XENDISPL_EDID_BLOCK_COUNT", XENDISPL_EDID_BLOCK_COUNT);
    snum("XENDISPL_EDID_MAX_SIZE", XENDISPL_EDID_MAX_SIZE);
    snum("XENDISPL_DBUF_FLG_REQ_ALLOC", XENDISPL_DBUF_FLG_REQ_ALLOC);
    snum("XENDISPL_EVENT_PAGE_SIZE", XENDISPL_EVENT_PAGE_SIZE);
    snum("XENDISPL_IN_RING_OFFS", XENDISPL_IN_RING_OFFS);
    snum("XENDISPL_IN_RING_SIZE", XENDISPL_IN_RING_SIZE);
    snum("XENDISPL_IN_RING_LEN", XENDISPL_IN_RING_LEN);
    close_obj();

    open_obj("errno");
    snum("EPERM", XEN_EPERM);
    snum("ENOENT", XEN_ENOENT);
    snum("EIO", XEN_EIO);
    snum("E2BIG", XEN_E2BIG);
    snum("EAGAIN", XEN_EAGAIN);
    snum("ENOMEM", XEN_ENOMEM);
    snum("EBUSY", XEN_EBUSY);
    snum("EEXIST", XEN_EEXIST);
    snum("ENODEV", XEN_ENODEV);
    snum("EINVAL", XEN_EINVAL);
    snum("ENOSPC", XEN_ENOSPC);
    snum("ENOSYS", XEN_ENOSYS);
    snum("EOPNOTSUPP", XEN_EOPNOTSUPP);
    snum("ETIMEDOUT", XEN_ETIMEDOUT);
    close_obj();
}

/* ---- samples ---------------------------------------------------------------------------- */

/* Set bytes [from, to) to a non-zero pattern: reserved space an old frontend left dirty. */
static void dirty(void *p, size_t from, size_t to)
{
    unsigned char *b = p;
    size_t i;

    for (i = from; i < to; i++)
        b[i] = (unsigned char)(0xa5 ^ i);
}

#define END_OF(S, path) (offsetof(S, path) + SIZEOF_MEMBER(S, path))

static size_t request_payload_end(const struct xendispl_req *r)
{
    switch (r->operation) {
    case XENDISPL_OP_DBUF_CREATE:
        return END_OF(struct xendispl_req, op.dbuf_create.data_ofs);
    case XENDISPL_OP_DBUF_DESTROY:
        return END_OF(struct xendispl_req, op.dbuf_destroy.dbuf_cookie);
    case XENDISPL_OP_FB_ATTACH:
        return END_OF(struct xendispl_req, op.fb_attach.pixel_format);
    case XENDISPL_OP_FB_DETACH:
        return END_OF(struct xendispl_req, op.fb_detach.fb_cookie);
    case XENDISPL_OP_SET_CONFIG:
        return END_OF(struct xendispl_req, op.set_config.bpp);
    case XENDISPL_OP_PG_FLIP:
        return END_OF(struct xendispl_req, op.pg_flip.fb_cookie);
    case XENDISPL_OP_GET_EDID:
        return END_OF(struct xendispl_req, op.get_edid.gref_directory);
    }
    return sizeof(*r);
}

static void request_fields(const struct xendispl_req *r)
{
    open_obj("fields");
    unum("id", r->id);
    unum("operation", r->operation);
    switch (r->operation) {
    case XENDISPL_OP_DBUF_CREATE:
        unum("dbuf_cookie", r->op.dbuf_create.dbuf_cookie);
        unum("width", r->op.dbuf_create.width);
        unum("height", r->op.dbuf_create.height);
        unum("bpp", r->op.dbuf_create.bpp);
        unum("buffer_sz", r->op.dbuf_create.buffer_sz);
        unum("flags", r->op.dbuf_create.flags);
        unum("gref_directory", r->op.dbuf_create.gref_directory);
        unum("data_ofs", r->op.dbuf_create.data_ofs);
        break;
    case XENDISPL_OP_DBUF_DESTROY:
        unum("dbuf_cookie", r->op.dbuf_destroy.dbuf_cookie);
        break;
    case XENDISPL_OP_FB_ATTACH:
        unum("dbuf_cookie", r->op.fb_attach.dbuf_cookie);
        unum("fb_cookie", r->op.fb_attach.fb_cookie);
        unum("width", r->op.fb_attach.width);
        unum("height", r->op.fb_attach.height);
        unum("pixel_format", r->op.fb_attach.pixel_format);
        break;
    case XENDISPL_OP_FB_DETACH:
        unum("fb_cookie", r->op.fb_detach.fb_cookie);
        break;
    case XENDISPL_OP_SET_CONFIG:
        unum("fb_cookie", r->op.set_config.fb_cookie);
        unum("x", r->op.set_config.x);
        unum("y", r->op.set_config.y);
        unum("width", r->op.set_config.width);
        unum("height", r->op.set_config.height);
        unum("bpp", r->op.set_config.bpp);
        break;
    case XENDISPL_OP_PG_FLIP:
        unum("fb_cookie", r->op.pg_flip.fb_cookie);
        break;
    case XENDISPL_OP_GET_EDID:
        unum("buffer_sz", r->op.get_edid.buffer_sz);
        unum("gref_directory", r->op.get_edid.gref_directory);
        break;
    }
    close_obj();
}

static void emit_request(const char *name, const struct xendispl_req *clean, int make_dirty)
{
    struct xendispl_req copy = *clean;

    if (make_dirty) {
        dirty(&copy, offsetof(struct xendispl_req, reserved), offsetof(struct xendispl_req, op));
        dirty(&copy, request_payload_end(clean), sizeof(copy));
    }
    open_obj(NULL);
    str("name", name);
    str("kind", "request");
    boolean("dirty", make_dirty);
    request_fields(&copy);
    hex("hex", &copy, sizeof(copy));
    hex("clean_hex", clean, sizeof(*clean));
    close_obj();
}

static void emit_response(const char *name, const struct xendispl_resp *clean, int make_dirty)
{
    struct xendispl_resp copy = *clean;

    if (make_dirty) {
        dirty(&copy, offsetof(struct xendispl_resp, reserved), offsetof(struct xendispl_resp, status));
        dirty(&copy, END_OF(struct xendispl_resp, op.get_edid.edid_sz), sizeof(copy));
    }
    open_obj(NULL);
    str("name", name);
    str("kind", "response");
    boolean("dirty", make_dirty);
    open_obj("fields");
    unum("id", copy.id);
    unum("operation", copy.operation);
    snum("status", copy.status);
    unum("edid_sz", copy.op.get_edid.edid_sz);
    close_obj();
    hex("hex", &copy, sizeof(copy));
    hex("clean_hex", clean, sizeof(*clean));
    close_obj();
}

static void emit_event(const char *name, const struct xendispl_evt *clean, int make_dirty)
{
    struct xendispl_evt copy = *clean;

    if (make_dirty) {
        dirty(&copy, offsetof(struct xendispl_evt, reserved), offsetof(struct xendispl_evt, op));
        dirty(&copy, END_OF(struct xendispl_evt, op.pg_flip.fb_cookie), sizeof(copy));
    }
    open_obj(NULL);
    str("name", name);
    str("kind", "event");
    boolean("dirty", make_dirty);
    open_obj("fields");
    unum("id", copy.id);
    unum("type", copy.type);
    unum("fb_cookie", copy.op.pg_flip.fb_cookie);
    close_obj();
    hex("hex", &copy, sizeof(copy));
    hex("clean_hex", clean, sizeof(*clean));
    close_obj();
}

static struct xendispl_req new_req(uint16_t id, uint8_t operation)
{
    struct xendispl_req r;

    memset(&r, 0, sizeof(r));
    r.id = id;
    r.operation = operation;
    return r;
}

static void request_samples(void)
{
    struct xendispl_req r;

    /* Reference section 15. */
    r = new_req(5, XENDISPL_OP_DBUF_CREATE);
    r.op.dbuf_create.dbuf_cookie = UINT64_C(0xffff888012345600);
    r.op.dbuf_create.width = 1920;
    r.op.dbuf_create.height = 1080;
    r.op.dbuf_create.bpp = 32;
    r.op.dbuf_create.buffer_sz = 8294400;
    r.op.dbuf_create.flags = 0;
    r.op.dbuf_create.gref_directory = 0xb10;
    r.op.dbuf_create.data_ofs = 0;
    emit_request("reference_dbuf_create", &r, 0);

    r = new_req(0xa1b2, XENDISPL_OP_DBUF_CREATE);
    r.op.dbuf_create.dbuf_cookie = UINT64_C(0x0123456789abcdef);
    r.op.dbuf_create.width = 0x11223344;
    r.op.dbuf_create.height = 0x55667788;
    r.op.dbuf_create.bpp = 0x99aabbcc;
    r.op.dbuf_create.buffer_sz = 0xddeeff01;
    r.op.dbuf_create.flags = XENDISPL_DBUF_FLG_REQ_ALLOC;
    r.op.dbuf_create.gref_directory = 0x87654321;
    r.op.dbuf_create.data_ofs = 0xfedcba98;
    emit_request("dbuf_create_all_fields", &r, 0);
    emit_request("dbuf_create_dirty_reserved", &r, 1);

    r = new_req(0xffff, XENDISPL_OP_DBUF_CREATE);
    r.op.dbuf_create.dbuf_cookie = UINT64_MAX;
    r.op.dbuf_create.width = UINT32_MAX;
    r.op.dbuf_create.height = UINT32_MAX;
    r.op.dbuf_create.bpp = UINT32_MAX;
    r.op.dbuf_create.buffer_sz = UINT32_MAX;
    r.op.dbuf_create.flags = UINT32_MAX;
    r.op.dbuf_create.gref_directory = UINT32_MAX;
    r.op.dbuf_create.data_ofs = UINT32_MAX;
    emit_request("dbuf_create_max", &r, 0);

    r = new_req(0x0102, XENDISPL_OP_DBUF_DESTROY);
    r.op.dbuf_destroy.dbuf_cookie = UINT64_C(0xfedcba9876543210);
    emit_request("dbuf_destroy", &r, 0);
    emit_request("dbuf_destroy_dirty_reserved", &r, 1);

    r = new_req(0x0304, XENDISPL_OP_FB_ATTACH);
    r.op.fb_attach.dbuf_cookie = UINT64_C(0x1122334455667788);
    r.op.fb_attach.fb_cookie = UINT64_C(0x99aabbccddeeff00);
    r.op.fb_attach.width = 1280;
    r.op.fb_attach.height = 720;
    r.op.fb_attach.pixel_format = 0x34325258; /* DRM_FORMAT_XRGB8888, 'XR24' */
    emit_request("fb_attach", &r, 0);
    emit_request("fb_attach_dirty_reserved", &r, 1);

    r = new_req(0x0506, XENDISPL_OP_FB_DETACH);
    r.op.fb_detach.fb_cookie = UINT64_C(0x8000000000000001);
    emit_request("fb_detach", &r, 0);

    r = new_req(0x0708, XENDISPL_OP_SET_CONFIG);
    r.op.set_config.fb_cookie = UINT64_C(0xffff888011112200);
    r.op.set_config.x = 0x01020304;
    r.op.set_config.y = 0x05060708;
    r.op.set_config.width = 0x090a0b0c;
    r.op.set_config.height = 0x0d0e0f10;
    r.op.set_config.bpp = 0x11121314;
    emit_request("set_config", &r, 0);
    emit_request("set_config_dirty_reserved", &r, 1);

    r = new_req(0x090a, XENDISPL_OP_SET_CONFIG);
    emit_request("set_config_disable", &r, 0);

    r = new_req(0x0b0c, XENDISPL_OP_PG_FLIP);
    r.op.pg_flip.fb_cookie = UINT64_C(0xffff888011112200);
    emit_request("pg_flip", &r, 0);
    emit_request("pg_flip_dirty_reserved", &r, 1);

    r = new_req(0x0d0e, XENDISPL_OP_GET_EDID);
    r.op.get_edid.buffer_sz = XENDISPL_EDID_MAX_SIZE;
    r.op.get_edid.gref_directory = 0xdeadbeef;
    emit_request("get_edid", &r, 0);
    emit_request("get_edid_dirty_reserved", &r, 1);
}

static struct xendispl_resp new_resp(uint16_t id, uint8_t operation, int32_t status)
{
    struct xendispl_resp r;

    memset(&r, 0, sizeof(r));
    r.id = id;
    r.operation = operation;
    r.status = status;
    return r;
}

static void response_samples(void)
{
    struct xendispl_resp r;

    r = new_resp(5, XENDISPL_OP_DBUF_CREATE, -XEN_EINVAL); /* reference section 15 */
    emit_response("reference_error", &r, 0);

    r = new_resp(0x0b0c, XENDISPL_OP_PG_FLIP, 0);
    emit_response("pg_flip_ok", &r, 0);

    r = new_resp(0xfffe, XENDISPL_OP_GET_EDID, 0);
    r.op.get_edid.edid_sz = 0x01020304;
    emit_response("get_edid_ok", &r, 0);
    emit_response("get_edid_ok_dirty_reserved", &r, 1);

    r = new_resp(0xffff, XENDISPL_OP_GET_EDID, 0);
    r.op.get_edid.edid_sz = UINT32_MAX;
    emit_response("get_edid_ok_max", &r, 0);

    r = new_resp(0xffff, 0xff, INT32_MIN);
    emit_response("unknown_operation_int32_min", &r, 0);

    r = new_resp(0x1234, XENDISPL_OP_FB_ATTACH, -XEN_EOPNOTSUPP);
    emit_response("fb_attach_eopnotsupp", &r, 0);
}

static struct xendispl_evt new_evt(uint16_t id, uint64_t fb_cookie)
{
    struct xendispl_evt e;

    memset(&e, 0, sizeof(e));
    e.id = id;
    e.type = XENDISPL_EVT_PG_FLIP;
    e.op.pg_flip.fb_cookie = fb_cookie;
    return e;
}

static void event_samples(void)
{
    struct xendispl_evt e;

    e = new_evt(0, UINT64_C(0xffff888011112200)); /* reference section 15 */
    emit_event("reference_pg_flip", &e, 0);

    e = new_evt(0x1234, UINT64_C(0x0123456789abcdef));
    emit_event("pg_flip_all_fields", &e, 0);
    emit_event("pg_flip_dirty_reserved", &e, 1);

    e = new_evt(0xffff, UINT64_MAX);
    emit_event("pg_flip_max", &e, 0);
}

int main(void)
{
    first[0] = 1;
    open_obj(NULL);
    structs();
    packets();
    ring();
    constants();
    open_arr("samples");
    request_samples();
    response_samples();
    event_samples();
    close_arr();
    close_obj();
    putchar('\n');
    return ferror(stdout) ? 1 : 0;
}
