/*
 * drmtest: the DomU side of the VM tests. Opens the xen-drm-front card, and for each
 * connector given on the command line creates two dumb buffers, draws the test pattern,
 * sets the mode (legacy SETCRTC) and page-flips FLIPS times waiting for each flip event,
 * then keeps the last frame on screen for HOLD seconds. Every step prints one line starting
 * with "DRMTEST " on the console; the harness (tests/vm) parses them.
 *
 *   drmtest DRIVER FLIPS HOLD CONNECTOR_INDEX...
 *
 * DRIVER is the DRM driver's name (xen-drm-front is "xendrm-du"); the first
 * /dev/dri/cardN of that driver is used (waiting up to 30 s for it to appear).
 *
 * Benchmark mode (bench/vm.py), when the environment has DRMTEST_WARMUP=W: both buffers are
 * drawn once (frames 0 and 1) and the loop only flips, as fast as the flip events come back;
 * after W flips it prints "DRMTEST BENCH START c", after the last
 * "DRMTEST BENCH c flips=N ns=T failed=F": N flips timed over T ns (CLOCK_MONOTONIC).
 *
 * Pattern of frame f on connector c at (x, y), as XRGB8888 bytes B,G,R,X in memory:
 *   R = (x + f) & 255, G = y & 255, B = ((x ^ y) + 64 * c) & 255.
 * Written for displback's tests; uses only the kernel's uapi DRM ioctls (no libdrm).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <drm.h>
#include <drm_mode.h>

#define MAX_IDS 16

struct buffer {
    uint32_t handle, pitch, fb_id;
    uint64_t size;
    uint8_t *map;
};

static int card = -1;

static int xioctl(unsigned long request, void *arg)
{
    int r;
    do {
        r = ioctl(card, request, arg);
    } while (r == -1 && (errno == EINTR || errno == EAGAIN));
    return r;
}

static void fail(const char *what)
{
    printf("DRMTEST FAIL %s errno=%d (%s)\n", what, errno, strerror(errno));
    fflush(stdout);
    exit(1);
}

static int open_driver(const char *driver)
{
    for (int n = 0; n < 8; n++) {
        char path[32];
        snprintf(path, sizeof path, "/dev/dri/card%d", n);
        int fd = open(path, O_RDWR | O_CLOEXEC);
        if (fd < 0)
            continue;
        char name[64] = {0};
        struct drm_version version = {.name_len = sizeof name - 1, .name = name};
        if (ioctl(fd, DRM_IOCTL_VERSION, &version) == 0 && strcmp(name, driver) == 0) {
            printf("DRMTEST OPEN %s driver=%s\n", path, name);
            return fd;
        }
        close(fd);
    }
    return -1;
}

static void draw(struct buffer *b, uint32_t w, uint32_t h, uint32_t frame, uint32_t conn)
{
    for (uint32_t y = 0; y < h; y++) {
        uint8_t *row = b->map + (uint64_t)y * b->pitch;
        for (uint32_t x = 0; x < w; x++) {
            row[4 * x + 0] = (uint8_t)((x ^ y) + 64 * conn);
            row[4 * x + 1] = (uint8_t)y;
            row[4 * x + 2] = (uint8_t)(x + frame);
            row[4 * x + 3] = 0xff;
        }
    }
}

static void make_buffer(struct buffer *b, uint32_t w, uint32_t h)
{
    struct drm_mode_create_dumb create = {.width = w, .height = h, .bpp = 32};
    if (xioctl(DRM_IOCTL_MODE_CREATE_DUMB, &create))
        fail("CREATE_DUMB");
    b->handle = create.handle;
    b->pitch = create.pitch;
    b->size = create.size;
    struct drm_mode_fb_cmd fb = {
        .width = w, .height = h, .pitch = create.pitch, .bpp = 32, .depth = 24,
        .handle = create.handle,
    };
    if (xioctl(DRM_IOCTL_MODE_ADDFB, &fb))
        fail("ADDFB");
    b->fb_id = fb.fb_id;
    struct drm_mode_map_dumb map = {.handle = create.handle};
    if (xioctl(DRM_IOCTL_MODE_MAP_DUMB, &map))
        fail("MAP_DUMB");
    b->map = mmap(NULL, create.size, PROT_READ | PROT_WRITE, MAP_SHARED, card, map.offset);
    if (b->map == MAP_FAILED)
        fail("mmap");
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int wait_flip(int timeout_ms)
{
    struct pollfd pfd = {.fd = card, .events = POLLIN};
    int r = poll(&pfd, 1, timeout_ms);
    if (r <= 0)
        return -1;
    char buf[1024];
    ssize_t n = read(card, buf, sizeof buf);
    for (ssize_t off = 0; off + (ssize_t)sizeof(struct drm_event) <= n;) {
        struct drm_event *ev = (struct drm_event *)(buf + off);
        if (ev->type == DRM_EVENT_FLIP_COMPLETE)
            return 0;
        off += ev->length;
    }
    return -1;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 5) {
        printf("DRMTEST FAIL usage\n");
        return 2;
    }
    int flips = atoi(argv[2]), hold = atoi(argv[3]);
    const char *warmup_env = getenv("DRMTEST_WARMUP");
    int bench = warmup_env != NULL, warmup = bench ? atoi(warmup_env) : 0;
    for (int i = 0; i < 300 && card < 0; i++) {
        card = open_driver(argv[1]);
        if (card < 0)
            usleep(100000);
    }
    if (card < 0)
        fail("no card of that driver");

    uint32_t crtcs[MAX_IDS], conns[MAX_IDS], encs[MAX_IDS], fbs[MAX_IDS];
    struct drm_mode_card_res res = {0};
    if (xioctl(DRM_IOCTL_MODE_GETRESOURCES, &res))
        fail("GETRESOURCES");
    if (res.count_crtcs > MAX_IDS || res.count_connectors > MAX_IDS ||
        res.count_encoders > MAX_IDS || res.count_fbs > MAX_IDS)
        fail("too many ids");
    res.crtc_id_ptr = (uintptr_t)crtcs;
    res.connector_id_ptr = (uintptr_t)conns;
    res.encoder_id_ptr = (uintptr_t)encs;
    res.fb_id_ptr = (uintptr_t)fbs;
    if (xioctl(DRM_IOCTL_MODE_GETRESOURCES, &res))
        fail("GETRESOURCES 2");
    printf("DRMTEST RESOURCES crtcs=%u connectors=%u\n", res.count_crtcs, res.count_connectors);

    for (int a = 4; a < argc; a++) {
        uint32_t index = (uint32_t)atoi(argv[a]);
        if (index >= res.count_connectors || index >= res.count_crtcs)
            fail("no such connector");
        struct drm_mode_modeinfo modes[8];
        struct drm_mode_get_connector conn = {.connector_id = conns[index]};
        if (xioctl(DRM_IOCTL_MODE_GETCONNECTOR, &conn))
            fail("GETCONNECTOR");
        if (conn.count_modes == 0 || conn.count_modes > 8)
            fail("connector modes");
        uint32_t count_modes = conn.count_modes;
        memset(&conn, 0, sizeof conn);
        conn.connector_id = conns[index];
        conn.count_modes = count_modes;
        conn.modes_ptr = (uintptr_t)modes;
        if (xioctl(DRM_IOCTL_MODE_GETCONNECTOR, &conn))
            fail("GETCONNECTOR 2");
        struct drm_mode_modeinfo mode = modes[0];
        uint32_t w = mode.hdisplay, h = mode.vdisplay;
        printf("DRMTEST CONNECTOR %u status=%u mode=%ux%u\n", index, conn.connection, w, h);

        struct buffer bufs[2];
        make_buffer(&bufs[0], w, h);
        make_buffer(&bufs[1], w, h);
        draw(&bufs[0], w, h, 0, index);
        if (bench)
            draw(&bufs[1], w, h, 1, index);
        struct drm_mode_crtc crtc = {
            .crtc_id = crtcs[index], .fb_id = bufs[0].fb_id, .set_connectors_ptr =
            (uintptr_t)&conns[index], .count_connectors = 1, .mode = mode, .mode_valid = 1,
        };
        if (xioctl(DRM_IOCTL_MODE_SETCRTC, &crtc))
            fail("SETCRTC");
        printf("DRMTEST SETCRTC %u ok\n", index);
        int ok = 0, timed_failed = 0;
        uint32_t frame = 0;
        uint64_t timed_from = now_ns();
        for (int f = 1; f <= flips; f++) {
            struct buffer *b = &bufs[f % 2];
            if (bench && f == warmup + 1) {
                printf("DRMTEST BENCH START %u\n", index);
                timed_from = now_ns();
                timed_failed = 0;
            }
            if (!bench)
                draw(b, w, h, (uint32_t)f, index);
            struct drm_mode_crtc_page_flip flip = {
                .crtc_id = crtcs[index], .fb_id = b->fb_id, .flags = DRM_MODE_PAGE_FLIP_EVENT,
            };
            if (xioctl(DRM_IOCTL_MODE_PAGE_FLIP, &flip)) {
                printf("DRMTEST FLIP %d failed errno=%d\n", f, errno);
                timed_failed++;
                continue;
            }
            if (wait_flip(3000) == 0) {
                ok++;
                frame = (uint32_t)f;
            } else {
                printf("DRMTEST FLIP %d no event\n", f);
                timed_failed++;
            }
        }
        if (bench)
            printf("DRMTEST BENCH %u flips=%d ns=%llu failed=%d\n", index,
                   flips > warmup ? flips - warmup : 0,
                   (unsigned long long)(now_ns() - timed_from), timed_failed);
        printf("DRMTEST FLIPS %u ok=%d of %d frame=%u\n", index, ok, flips, frame);
    }
    printf("DRMTEST DONE\n");
    for (int s = 0; s < hold; s++)
        sleep(1);
    printf("DRMTEST EXIT\n");
    return 0;
}
