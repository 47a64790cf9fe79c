/*
 * Golden layout of the DRM/KMS UAPI for displback.kms.uapi, from Debian's libdrm-dev headers
 * (/usr/include/libdrm/drm.h, drm_mode.h).
 *
 * Compiled and run at test time by tests/kms/golden.py. Prints one JSON object:
 *   structs   - {name: {"size": sizeof, "fields": {member: [offsetof, sizeof]}}}
 *   ioctls    - {short name: request number} for every DRM_IOCTL_* displback uses
 *   constants - {name: value} for the capability, flag, event, object and connector constants
 * Written for this project; nothing is copied from libdrm or Linux.
 */
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <drm.h>
#include <drm_mode.h>
#include <xf86drmMode.h>

static int first_struct = 1;
static int first_field;

static void begin_struct(const char *name, size_t size)
{
    printf("%s\"%s\":{\"size\":%zu,\"fields\":{", first_struct ? "" : ",", name, size);
    first_struct = 0;
    first_field = 1;
}

static void field(const char *name, size_t offset, size_t size)
{
    printf("%s\"%s\":[%zu,%zu]", first_field ? "" : ",", name, offset, size);
    first_field = 0;
}

static void end_struct(void)
{
    printf("}}");
}

#define S(type) begin_struct(#type, sizeof(struct type))
#define F(type, member) \
    field(#member, offsetof(struct type, member), sizeof(((struct type *)0)->member))

static int first_value;

static void value(const char *name, unsigned long long v)
{
    printf("%s\"%s\":%llu", first_value ? "" : ",", name, v);
    first_value = 0;
}

#define IOCTL(short_name) value(#short_name, (unsigned long long)DRM_IOCTL_##short_name)
#define C(name) value(#name, (unsigned long long)(name))

int main(void)
{
    printf("{\"structs\":{");
    S(drm_version); F(drm_version, version_major); F(drm_version, version_minor);
    F(drm_version, version_patchlevel); F(drm_version, name_len); F(drm_version, name);
    F(drm_version, date_len); F(drm_version, date); F(drm_version, desc_len);
    F(drm_version, desc); end_struct();
    S(drm_get_cap); F(drm_get_cap, capability); F(drm_get_cap, value); end_struct();
    S(drm_set_client_cap); F(drm_set_client_cap, capability); F(drm_set_client_cap, value);
    end_struct();
    S(drm_prime_handle); F(drm_prime_handle, handle); F(drm_prime_handle, flags);
    F(drm_prime_handle, fd); end_struct();
    S(drm_gem_close); F(drm_gem_close, handle); F(drm_gem_close, pad); end_struct();
    S(drm_event); F(drm_event, type); F(drm_event, length); end_struct();
    S(drm_event_vblank); F(drm_event_vblank, base); F(drm_event_vblank, user_data);
    F(drm_event_vblank, tv_sec); F(drm_event_vblank, tv_usec); F(drm_event_vblank, sequence);
    F(drm_event_vblank, crtc_id); end_struct();
    S(drm_mode_modeinfo); F(drm_mode_modeinfo, clock); F(drm_mode_modeinfo, hdisplay);
    F(drm_mode_modeinfo, hsync_start); F(drm_mode_modeinfo, hsync_end);
    F(drm_mode_modeinfo, htotal); F(drm_mode_modeinfo, hskew); F(drm_mode_modeinfo, vdisplay);
    F(drm_mode_modeinfo, vsync_start); F(drm_mode_modeinfo, vsync_end);
    F(drm_mode_modeinfo, vtotal); F(drm_mode_modeinfo, vscan); F(drm_mode_modeinfo, vrefresh);
    F(drm_mode_modeinfo, flags); F(drm_mode_modeinfo, type); F(drm_mode_modeinfo, name);
    end_struct();
    S(drm_mode_card_res); F(drm_mode_card_res, fb_id_ptr); F(drm_mode_card_res, crtc_id_ptr);
    F(drm_mode_card_res, connector_id_ptr); F(drm_mode_card_res, encoder_id_ptr);
    F(drm_mode_card_res, count_fbs); F(drm_mode_card_res, count_crtcs);
    F(drm_mode_card_res, count_connectors); F(drm_mode_card_res, count_encoders);
    F(drm_mode_card_res, min_width); F(drm_mode_card_res, max_width);
    F(drm_mode_card_res, min_height); F(drm_mode_card_res, max_height); end_struct();
    S(drm_mode_crtc); F(drm_mode_crtc, set_connectors_ptr); F(drm_mode_crtc, count_connectors);
    F(drm_mode_crtc, crtc_id); F(drm_mode_crtc, fb_id); F(drm_mode_crtc, x); F(drm_mode_crtc, y);
    F(drm_mode_crtc, gamma_size); F(drm_mode_crtc, mode_valid); F(drm_mode_crtc, mode);
    end_struct();
    S(drm_mode_get_encoder); F(drm_mode_get_encoder, encoder_id);
    F(drm_mode_get_encoder, encoder_type); F(drm_mode_get_encoder, crtc_id);
    F(drm_mode_get_encoder, possible_crtcs); F(drm_mode_get_encoder, possible_clones);
    end_struct();
    S(drm_mode_get_connector); F(drm_mode_get_connector, encoders_ptr);
    F(drm_mode_get_connector, modes_ptr); F(drm_mode_get_connector, props_ptr);
    F(drm_mode_get_connector, prop_values_ptr); F(drm_mode_get_connector, count_modes);
    F(drm_mode_get_connector, count_props); F(drm_mode_get_connector, count_encoders);
    F(drm_mode_get_connector, encoder_id); F(drm_mode_get_connector, connector_id);
    F(drm_mode_get_connector, connector_type); F(drm_mode_get_connector, connector_type_id);
    F(drm_mode_get_connector, connection); F(drm_mode_get_connector, mm_width);
    F(drm_mode_get_connector, mm_height); F(drm_mode_get_connector, subpixel);
    F(drm_mode_get_connector, pad); end_struct();
    S(drm_mode_get_plane_res); F(drm_mode_get_plane_res, plane_id_ptr);
    F(drm_mode_get_plane_res, count_planes); end_struct();
    S(drm_mode_get_plane); F(drm_mode_get_plane, plane_id); F(drm_mode_get_plane, crtc_id);
    F(drm_mode_get_plane, fb_id); F(drm_mode_get_plane, possible_crtcs);
    F(drm_mode_get_plane, gamma_size); F(drm_mode_get_plane, count_format_types);
    F(drm_mode_get_plane, format_type_ptr); end_struct();
    S(drm_mode_obj_get_properties); F(drm_mode_obj_get_properties, props_ptr);
    F(drm_mode_obj_get_properties, prop_values_ptr); F(drm_mode_obj_get_properties, count_props);
    F(drm_mode_obj_get_properties, obj_id); F(drm_mode_obj_get_properties, obj_type);
    end_struct();
    S(drm_mode_get_property); F(drm_mode_get_property, values_ptr);
    F(drm_mode_get_property, enum_blob_ptr); F(drm_mode_get_property, prop_id);
    F(drm_mode_get_property, flags); F(drm_mode_get_property, name);
    F(drm_mode_get_property, count_values); F(drm_mode_get_property, count_enum_blobs);
    end_struct();
    S(drm_mode_property_enum); F(drm_mode_property_enum, value);
    F(drm_mode_property_enum, name); end_struct();
    S(drm_mode_create_dumb); F(drm_mode_create_dumb, height); F(drm_mode_create_dumb, width);
    F(drm_mode_create_dumb, bpp); F(drm_mode_create_dumb, flags); F(drm_mode_create_dumb, handle);
    F(drm_mode_create_dumb, pitch); F(drm_mode_create_dumb, size); end_struct();
    S(drm_mode_map_dumb); F(drm_mode_map_dumb, handle); F(drm_mode_map_dumb, pad);
    F(drm_mode_map_dumb, offset); end_struct();
    S(drm_mode_destroy_dumb); F(drm_mode_destroy_dumb, handle); end_struct();
    S(drm_mode_fb_cmd2); F(drm_mode_fb_cmd2, fb_id); F(drm_mode_fb_cmd2, width);
    F(drm_mode_fb_cmd2, height); F(drm_mode_fb_cmd2, pixel_format); F(drm_mode_fb_cmd2, flags);
    F(drm_mode_fb_cmd2, handles); F(drm_mode_fb_cmd2, pitches); F(drm_mode_fb_cmd2, offsets);
    F(drm_mode_fb_cmd2, modifier); end_struct();
    S(drm_mode_crtc_page_flip); F(drm_mode_crtc_page_flip, crtc_id);
    F(drm_mode_crtc_page_flip, fb_id); F(drm_mode_crtc_page_flip, flags);
    F(drm_mode_crtc_page_flip, reserved); F(drm_mode_crtc_page_flip, user_data); end_struct();
    S(drm_mode_atomic); F(drm_mode_atomic, flags); F(drm_mode_atomic, count_objs);
    F(drm_mode_atomic, objs_ptr); F(drm_mode_atomic, count_props_ptr);
    F(drm_mode_atomic, props_ptr); F(drm_mode_atomic, prop_values_ptr);
    F(drm_mode_atomic, reserved); F(drm_mode_atomic, user_data); end_struct();
    S(drm_mode_create_blob); F(drm_mode_create_blob, data); F(drm_mode_create_blob, length);
    F(drm_mode_create_blob, blob_id); end_struct();
    S(drm_mode_destroy_blob); F(drm_mode_destroy_blob, blob_id); end_struct();
    printf("},\"ioctls\":{");
    first_value = 1;
    IOCTL(VERSION); IOCTL(GEM_CLOSE); IOCTL(GET_CAP); IOCTL(SET_CLIENT_CAP); IOCTL(SET_MASTER);
    IOCTL(DROP_MASTER); IOCTL(PRIME_HANDLE_TO_FD); IOCTL(PRIME_FD_TO_HANDLE);
    IOCTL(MODE_GETRESOURCES); IOCTL(MODE_GETCRTC); IOCTL(MODE_SETCRTC); IOCTL(MODE_GETENCODER);
    IOCTL(MODE_GETCONNECTOR); IOCTL(MODE_GETPROPERTY); IOCTL(MODE_RMFB); IOCTL(MODE_PAGE_FLIP);
    IOCTL(MODE_CREATE_DUMB); IOCTL(MODE_MAP_DUMB); IOCTL(MODE_DESTROY_DUMB);
    IOCTL(MODE_GETPLANERESOURCES); IOCTL(MODE_GETPLANE); IOCTL(MODE_ADDFB2);
    IOCTL(MODE_OBJ_GETPROPERTIES); IOCTL(MODE_ATOMIC); IOCTL(MODE_CREATEPROPBLOB);
    IOCTL(MODE_DESTROYPROPBLOB);
    printf("},\"constants\":{");
    first_value = 1;
    C(DRM_CAP_DUMB_BUFFER); C(DRM_CAP_VBLANK_HIGH_CRTC); C(DRM_CAP_DUMB_PREFERRED_DEPTH);
    C(DRM_CAP_DUMB_PREFER_SHADOW); C(DRM_CAP_PRIME); C(DRM_CAP_TIMESTAMP_MONOTONIC);
    C(DRM_CAP_ASYNC_PAGE_FLIP); C(DRM_CAP_CURSOR_WIDTH); C(DRM_CAP_CURSOR_HEIGHT);
    C(DRM_CAP_ADDFB2_MODIFIERS); C(DRM_CAP_PAGE_FLIP_TARGET); C(DRM_CAP_CRTC_IN_VBLANK_EVENT);
    C(DRM_PRIME_CAP_IMPORT); C(DRM_PRIME_CAP_EXPORT); C(DRM_CLOEXEC); C(DRM_RDWR);
    C(DRM_CLIENT_CAP_STEREO_3D); C(DRM_CLIENT_CAP_UNIVERSAL_PLANES); C(DRM_CLIENT_CAP_ATOMIC);
    C(DRM_CLIENT_CAP_ASPECT_RATIO); C(DRM_CLIENT_CAP_WRITEBACK_CONNECTORS);
    C(DRM_MODE_PAGE_FLIP_EVENT); C(DRM_MODE_PAGE_FLIP_ASYNC); C(DRM_MODE_ATOMIC_TEST_ONLY);
    C(DRM_MODE_ATOMIC_NONBLOCK); C(DRM_MODE_ATOMIC_ALLOW_MODESET); C(DRM_MODE_FB_MODIFIERS);
    C(DRM_EVENT_VBLANK); C(DRM_EVENT_FLIP_COMPLETE);
    C(DRM_MODE_TYPE_PREFERRED); C(DRM_MODE_TYPE_DRIVER); C(DRM_MODE_FLAG_INTERLACE);
    C(DRM_MODE_FLAG_DBLSCAN); C(DRM_MODE_PROP_RANGE); C(DRM_MODE_PROP_IMMUTABLE);
    C(DRM_MODE_PROP_ENUM); C(DRM_MODE_PROP_BLOB); C(DRM_MODE_PROP_BITMASK);
    C(DRM_MODE_PROP_EXTENDED_TYPE); C(DRM_MODE_PROP_OBJECT); C(DRM_MODE_PROP_SIGNED_RANGE);
    C(DRM_MODE_PROP_ATOMIC); C(DRM_DISPLAY_MODE_LEN); C(DRM_PROP_NAME_LEN);
    C(DRM_MODE_OBJECT_CRTC); C(DRM_MODE_OBJECT_CONNECTOR); C(DRM_MODE_OBJECT_ENCODER);
    C(DRM_MODE_OBJECT_MODE); C(DRM_MODE_OBJECT_PROPERTY); C(DRM_MODE_OBJECT_FB);
    C(DRM_MODE_OBJECT_BLOB); C(DRM_MODE_OBJECT_PLANE); C(DRM_MODE_OBJECT_ANY);
    C(DRM_MODE_CONNECTED); C(DRM_MODE_DISCONNECTED); C(DRM_MODE_UNKNOWNCONNECTION);
    C(DRM_MODE_ENCODER_NONE); C(DRM_MODE_ENCODER_DAC); C(DRM_MODE_ENCODER_TMDS);
    C(DRM_MODE_ENCODER_LVDS); C(DRM_MODE_ENCODER_TVDAC); C(DRM_MODE_ENCODER_VIRTUAL);
    C(DRM_MODE_ENCODER_DSI); C(DRM_MODE_ENCODER_DPMST); C(DRM_MODE_ENCODER_DPI);
    C(DRM_MODE_CONNECTOR_Unknown); C(DRM_MODE_CONNECTOR_VGA); C(DRM_MODE_CONNECTOR_DVII);
    C(DRM_MODE_CONNECTOR_DVID); C(DRM_MODE_CONNECTOR_DVIA); C(DRM_MODE_CONNECTOR_Composite);
    C(DRM_MODE_CONNECTOR_SVIDEO); C(DRM_MODE_CONNECTOR_LVDS); C(DRM_MODE_CONNECTOR_Component);
    C(DRM_MODE_CONNECTOR_9PinDIN); C(DRM_MODE_CONNECTOR_DisplayPort);
    C(DRM_MODE_CONNECTOR_HDMIA); C(DRM_MODE_CONNECTOR_HDMIB); C(DRM_MODE_CONNECTOR_TV);
    C(DRM_MODE_CONNECTOR_eDP); C(DRM_MODE_CONNECTOR_VIRTUAL); C(DRM_MODE_CONNECTOR_DSI);
    C(DRM_MODE_CONNECTOR_DPI); C(DRM_MODE_CONNECTOR_WRITEBACK); C(DRM_MODE_CONNECTOR_SPI);
    C(DRM_MODE_CONNECTOR_USB);
    printf("}}\n");
    return 0;
}
