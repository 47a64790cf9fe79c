/*
 * Golden vectors for displback's kbdif code, from Xen's own kbdif.h (Debian libxen-dev).
 *
 * Compiled and run at test time by tests/golden/__init__.py (kbdif_golden). Prints one JSON
 * object with:
 *   offsets   - offsetof/sizeof of every member of the in-event structs, the union and the
 *               shared page header;
 *   constants - the XENKBD_* numbers (types, multi-touch sub-types, ring geometry);
 *   fields    - the XENKBD_FIELD_* node names;
 *   samples   - one event of every kind filled in C through the union, as hex of 40 bytes,
 *               with a page slot address for a few indexes (XENKBD_IN_RING_REF).
 * Written for this project; nothing is copied from Xen or Linux.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <xen/io/kbdif.h>

static int first = 1;

static void sep(void)
{
    if (!first)
        putchar(',');
    first = 0;
}

#define NUM(name, value) do { sep(); printf("\"%s\":%ld", name, (long)(value)); } while (0)
#define STR(name, value) do { sep(); printf("\"%s\":\"%s\"", name, value); } while (0)
#define OFS(type, member) do { \
        sep(); \
        printf("\"%s.%s\":[%zu,%zu]", #type, #member, offsetof(struct type, member), \
               sizeof(((struct type *)0)->member)); \
    } while (0)

static void hex(const char *name, const union xenkbd_in_event *event)
{
    const unsigned char *bytes = (const unsigned char *)event;
    sep();
    printf("\"%s\":\"", name);
    for (size_t i = 0; i < sizeof(*event); i++)
        printf("%02x", bytes[i]);
    putchar('"');
}

int main(void)
{
    union xenkbd_in_event event;
    static unsigned char page[4096];

    printf("{\"offsets\":{");
    OFS(xenkbd_motion, type);
    OFS(xenkbd_motion, rel_x);
    OFS(xenkbd_motion, rel_y);
    OFS(xenkbd_motion, rel_z);
    OFS(xenkbd_key, type);
    OFS(xenkbd_key, pressed);
    OFS(xenkbd_key, keycode);
    OFS(xenkbd_position, type);
    OFS(xenkbd_position, abs_x);
    OFS(xenkbd_position, abs_y);
    OFS(xenkbd_position, rel_z);
    OFS(xenkbd_mtouch, type);
    OFS(xenkbd_mtouch, event_type);
    OFS(xenkbd_mtouch, contact_id);
    OFS(xenkbd_mtouch, u.pos.abs_x);
    OFS(xenkbd_mtouch, u.pos.abs_y);
    OFS(xenkbd_mtouch, u.shape.major);
    OFS(xenkbd_mtouch, u.shape.minor);
    OFS(xenkbd_mtouch, u.orientation);
    OFS(xenkbd_page, in_cons);
    OFS(xenkbd_page, in_prod);
    OFS(xenkbd_page, out_cons);
    OFS(xenkbd_page, out_prod);
    NUM("sizeof.xenkbd_in_event", sizeof(union xenkbd_in_event));
    printf("},\"constants\":{");
    first = 1;
    NUM("XENKBD_TYPE_MOTION", XENKBD_TYPE_MOTION);
    NUM("XENKBD_TYPE_KEY", XENKBD_TYPE_KEY);
    NUM("XENKBD_TYPE_POS", XENKBD_TYPE_POS);
    NUM("XENKBD_TYPE_MTOUCH", XENKBD_TYPE_MTOUCH);
    NUM("XENKBD_MT_EV_DOWN", XENKBD_MT_EV_DOWN);
    NUM("XENKBD_MT_EV_UP", XENKBD_MT_EV_UP);
    NUM("XENKBD_MT_EV_MOTION", XENKBD_MT_EV_MOTION);
    NUM("XENKBD_MT_EV_SYN", XENKBD_MT_EV_SYN);
    NUM("XENKBD_MT_EV_SHAPE", XENKBD_MT_EV_SHAPE);
    NUM("XENKBD_MT_EV_ORIENT", XENKBD_MT_EV_ORIENT);
    NUM("XENKBD_IN_EVENT_SIZE", XENKBD_IN_EVENT_SIZE);
    NUM("XENKBD_IN_RING_SIZE", XENKBD_IN_RING_SIZE);
    NUM("XENKBD_IN_RING_LEN", XENKBD_IN_RING_LEN);
    NUM("XENKBD_IN_RING_OFFS", XENKBD_IN_RING_OFFS);
    NUM("XENKBD_OUT_RING_SIZE", XENKBD_OUT_RING_SIZE);
    NUM("XENKBD_OUT_RING_OFFS", XENKBD_OUT_RING_OFFS);
    printf("},\"fields\":{");
    first = 1;
    STR("XENKBD_DRIVER_NAME", XENKBD_DRIVER_NAME);
    STR("XENKBD_FIELD_FEAT_DSBL_KEYBRD", XENKBD_FIELD_FEAT_DSBL_KEYBRD);
    STR("XENKBD_FIELD_FEAT_DSBL_POINTER", XENKBD_FIELD_FEAT_DSBL_POINTER);
    STR("XENKBD_FIELD_FEAT_ABS_POINTER", XENKBD_FIELD_FEAT_ABS_POINTER);
    STR("XENKBD_FIELD_FEAT_RAW_POINTER", XENKBD_FIELD_FEAT_RAW_POINTER);
    STR("XENKBD_FIELD_FEAT_MTOUCH", XENKBD_FIELD_FEAT_MTOUCH);
    STR("XENKBD_FIELD_REQ_ABS_POINTER", XENKBD_FIELD_REQ_ABS_POINTER);
    STR("XENKBD_FIELD_REQ_RAW_POINTER", XENKBD_FIELD_REQ_RAW_POINTER);
    STR("XENKBD_FIELD_REQ_MTOUCH", XENKBD_FIELD_REQ_MTOUCH);
    STR("XENKBD_FIELD_RING_GREF", XENKBD_FIELD_RING_GREF);
    STR("XENKBD_FIELD_EVT_CHANNEL", XENKBD_FIELD_EVT_CHANNEL);
    STR("XENKBD_FIELD_WIDTH", XENKBD_FIELD_WIDTH);
    STR("XENKBD_FIELD_HEIGHT", XENKBD_FIELD_HEIGHT);
    STR("XENKBD_FIELD_MT_WIDTH", XENKBD_FIELD_MT_WIDTH);
    STR("XENKBD_FIELD_MT_HEIGHT", XENKBD_FIELD_MT_HEIGHT);
    STR("XENKBD_FIELD_MT_NUM_CONTACTS", XENKBD_FIELD_MT_NUM_CONTACTS);
    STR("XENKBD_FIELD_RING_REF", XENKBD_FIELD_RING_REF);
    printf("},\"samples\":{");
    first = 1;

    memset(&event, 0, sizeof(event));
    event.motion.type = XENKBD_TYPE_MOTION;
    event.motion.rel_x = -5;
    event.motion.rel_y = 7;
    event.motion.rel_z = -1;
    hex("motion", &event);

    memset(&event, 0, sizeof(event));
    event.key.type = XENKBD_TYPE_KEY;
    event.key.pressed = 1;
    event.key.keycode = 0x110; /* BTN_LEFT */
    hex("key", &event);

    memset(&event, 0, sizeof(event));
    event.pos.type = XENKBD_TYPE_POS;
    event.pos.abs_x = 1919;
    event.pos.abs_y = 1079;
    event.pos.rel_z = 2;
    hex("pos", &event);

    memset(&event, 0, sizeof(event));
    event.mtouch.type = XENKBD_TYPE_MTOUCH;
    event.mtouch.event_type = XENKBD_MT_EV_DOWN;
    event.mtouch.contact_id = 3;
    event.mtouch.u.pos.abs_x = 100;
    event.mtouch.u.pos.abs_y = 200;
    hex("mt_down", &event);

    event.mtouch.event_type = XENKBD_MT_EV_MOTION;
    event.mtouch.u.pos.abs_x = -1;
    event.mtouch.u.pos.abs_y = 65536;
    hex("mt_motion", &event);

    memset(&event, 0, sizeof(event));
    event.mtouch.type = XENKBD_TYPE_MTOUCH;
    event.mtouch.event_type = XENKBD_MT_EV_UP;
    event.mtouch.contact_id = 9;
    hex("mt_up", &event);

    event.mtouch.event_type = XENKBD_MT_EV_SYN;
    event.mtouch.contact_id = 0;
    hex("mt_syn", &event);

    memset(&event, 0, sizeof(event));
    event.mtouch.type = XENKBD_TYPE_MTOUCH;
    event.mtouch.event_type = XENKBD_MT_EV_SHAPE;
    event.mtouch.contact_id = 1;
    event.mtouch.u.shape.major = 40;
    event.mtouch.u.shape.minor = 0xfffffff0u;
    hex("mt_shape", &event);

    memset(&event, 0, sizeof(event));
    event.mtouch.type = XENKBD_TYPE_MTOUCH;
    event.mtouch.event_type = XENKBD_MT_EV_ORIENT;
    event.mtouch.contact_id = 2;
    event.mtouch.u.orientation = -90;
    hex("mt_orient", &event);

    printf("},\"slots\":{");
    first = 1;
    {
        static const uint32_t indexes[] = {0, 1, 50, 51, 52, 0xffffffffu, 0xfffffffeu};
        for (size_t i = 0; i < sizeof(indexes) / sizeof(indexes[0]); i++) {
            char name[16];
            snprintf(name, sizeof(name), "%u", indexes[i]);
            NUM(name, (char *)&XENKBD_IN_RING_REF(page, indexes[i]) - (char *)page);
        }
    }
    printf("}}\n");
    return 0;
}
